"""Scores: how well a simulator's predicted activations track a neuron's true activations.

The score of one modality is the Pearson correlation between predicted and true values
(0-10 scale) pooled over the neuron's scoring set: its held-out exemplars (top samples the
explainer never saw) plus a few random samples from outside its top-N. The random samples
are what stops a prediction that is high on every image or every sentence from scoring
well: it is also high where the neuron is silent.

Correlation is undefined when either side is constant. The rule, applied alike to pooled
and per-sample scores:
- true activations constant (e.g. a dead neuron, or a random sample where it never
  fires): the score is undefined, stored as null, never a number;
- prediction constant while the truth varies (the simulator predicts nothing, or the
  same value everywhere): the score is 0, the correlation of an uninformative predictor,
  and `constant_prediction` flags it.

A multimodal neuron gets a visual and a text score; its `score` is the text score
(`simulate.multimodal_score: text`, METHOD.md 6) or their mean (`mean`: of those that
are defined). A neuron scored by both for lack of a category (unknown) gets the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Modality = Literal["visual", "text"]
Role = Literal["held_out", "random"]


@dataclass(frozen=True)
class Correlation:
    """A Pearson correlation with the constant-input rule of this module."""

    value: float | None
    """r in [-1, 1]; 0 when the prediction is constant; None when the truth is constant."""
    constant_prediction: bool = False
    """The prediction was constant (value set to 0 by rule)."""


def correlation(predicted: np.ndarray, true: np.ndarray) -> Correlation:
    """Pearson r of two equal-length value arrays, with the module's constant-input rule."""
    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.size} values, truth has {t.size}")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("predicted and true activations must be finite")
    if t.size < 2 or np.ptp(t) == 0:
        return Correlation(None)
    if np.ptp(p) == 0:
        return Correlation(0.0, constant_prediction=True)
    pc, tc = p - p.mean(), t - t.mean()
    r = float((pc @ tc) / math.sqrt(float(pc @ pc) * float(tc @ tc)))
    return Correlation(max(-1.0, min(1.0, r)))


@dataclass(frozen=True)
class ScoredSample:
    """One sample of a scoring set: the simulator's prediction beside the truth."""

    sample_id: str
    role: Role
    """`held_out` (a top exemplar the explainer did not see) or `random` (outside the top-N)."""
    predicted: np.ndarray
    """Predicted activations, 0-10: the H x W patch map (visual) or one value per token (text)."""
    true: np.ndarray
    """True normalised activations, same shape as `predicted`."""


@dataclass(frozen=True)
class SampleScore:
    """The correlation on one sample alone (kept for inspection, not averaged into the score)."""

    sample_id: str
    modality: Modality
    role: Role
    score: float | None
    """Per-sample r by the module's rule (None when this sample's truth is constant)."""


@dataclass(frozen=True)
class ModalityScore:
    """The score of one modality of one neuron for one explanation."""

    modality: Modality
    score: float | None
    """Pooled Pearson r over all samples (None when the pooled truth is constant)."""
    constant_prediction: bool
    """The pooled prediction was constant (score 0 by rule)."""
    samples: list[SampleScore]
    """Per-sample scores, in scoring-set order."""


def score_modality(modality: Modality, samples: list[ScoredSample]) -> ModalityScore:
    """Pooled correlation over the samples plus each sample's own correlation."""
    if not samples:
        return ModalityScore(modality, None, False, [])
    for s in samples:
        if np.shape(s.predicted) != np.shape(s.true):
            raise ValueError(
                f"sample {s.sample_id}: predicted shape {np.shape(s.predicted)} != true shape {np.shape(s.true)}"
            )
    pooled = correlation(
        np.concatenate([np.ravel(s.predicted) for s in samples]),
        np.concatenate([np.ravel(s.true) for s in samples]),
    )
    per_sample = [
        SampleScore(s.sample_id, modality, s.role, correlation(s.predicted, s.true).value) for s in samples
    ]
    return ModalityScore(modality, pooled.value, pooled.constant_prediction, per_sample)


def combined_score(scores: list[ModalityScore]) -> float | None:
    """The neuron's score: the one modality's score, or the mean of the defined ones."""
    defined = [s.score for s in scores if s.score is not None]
    return float(np.mean(defined)) if defined else None
