"""Scoring: Pearson correlation with the constant-input rule, pooled over held-out and random samples."""

from __future__ import annotations

import numpy as np
import pytest

from builder.simulate.scoring import ScoredSample, combined_score, correlation, score_modality


def _blob_map(rng: np.random.Generator, grid: int = 6) -> np.ndarray:
    """A random rectangular object mask on a grid."""
    m = np.zeros((grid, grid))
    r, c = rng.integers(0, grid - 2, size=2)
    h, w = rng.integers(2, 4, size=2)
    m[r : r + h, c : c + w] = 1
    return m


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(0)
    truths = [rng.uniform(0, 10, (6, 6)) for _ in range(5)]
    samples = [ScoredSample(f"s{i}", "held_out", t * 0.5 + 1, t) for i, t in enumerate(truths)]  # any affine map
    result = score_modality("visual", samples)
    assert result.score == pytest.approx(1.0)
    assert not result.constant_prediction
    assert [s.score for s in result.samples] == pytest.approx([1.0] * 5)
    assert [s.sample_id for s in result.samples] == ["s0", "s1", "s2", "s3", "s4"]


def test_always_on_prediction_scores_low_once_random_samples_are_scored():
    # The neuron fires on the objects of its top samples only; the "simulator" marks every
    # object in every image. On held-out samples alone it looks perfect.
    rng = np.random.default_rng(1)
    held = [ScoredSample(f"h{i}", "held_out", m * 10, m * 8) for i, m in enumerate(_blob_map(rng) for _ in range(5))]
    assert score_modality("visual", held).score == pytest.approx(1.0)
    random = [ScoredSample(f"r{i}", "random", m * 10, np.zeros((6, 6)))
              for i, m in enumerate(_blob_map(rng) for _ in range(15))]
    pooled = score_modality("visual", held + random)
    assert pooled.score < 0.5
    # random samples where the neuron is silent have no per-sample correlation
    assert [s.score for s in pooled.samples if s.role == "random"] == [None] * 15


def test_uniform_always_on_prediction_is_constant_and_scores_zero():
    rng = np.random.default_rng(2)
    samples = [ScoredSample(f"s{i}", "held_out", np.full((6, 6), 10.0), _blob_map(rng) * 9) for i in range(5)]
    result = score_modality("visual", samples)
    assert result.score == 0.0 and result.constant_prediction
    assert all(s.score == 0.0 for s in result.samples)


def test_constant_truth_is_undefined_never_a_number():
    c = correlation(np.array([0, 5, 10.0]), np.zeros(3))
    assert c.value is None and not c.constant_prediction
    assert correlation(np.array([1.0]), np.array([2.0])).value is None
    samples = [ScoredSample("s", "held_out", np.arange(4.0), np.zeros(4))]
    assert score_modality("text", samples).score is None


def test_correlation_matches_numpy_and_checks_inputs():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert correlation(a, b).value == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert correlation(a, -a).value == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="50 values"):
        correlation(a, b[:10])
    with pytest.raises(ValueError, match="finite"):
        correlation(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="predicted shape"):
        score_modality("text", [ScoredSample("s", "held_out", np.zeros(3), np.zeros(4))])


def test_text_scores_pool_samples_of_different_lengths():
    samples = [
        ScoredSample("a", "held_out", np.array([0, 10, 0.0]), np.array([0, 9, 1.0])),
        ScoredSample("b", "random", np.array([0, 0, 0, 10.0, 0]), np.array([0, 0, 0, 7.0, 0])),
    ]
    result = score_modality("text", samples)
    expected = np.corrcoef([0, 10, 0, 0, 0, 0, 10, 0], [0, 9, 1, 0, 0, 0, 7, 0])[0, 1]
    assert result.score == pytest.approx(expected)


def test_combined_score_is_the_mean_of_defined_scores():
    from builder.simulate.scoring import ModalityScore

    v = ModalityScore("visual", 0.6, False, [])
    t = ModalityScore("text", 0.2, False, [])
    u = ModalityScore("text", None, False, [])
    assert combined_score([v, t]) == pytest.approx(0.4)
    assert combined_score([v, u]) == pytest.approx(0.6)
    assert combined_score([u]) is None
    assert score_modality("visual", []).score is None
