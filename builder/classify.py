"""The classify stage: METHOD.md section 4 applied, exactly, to the capture state.

Per neuron, every top-N sample is normalised by the neuron's global max
(`a_norm = clip(a / max * 10, 0, 10)`), tested for visual activation (at least nv visual
tokens with a_norm > Tv) and text activation (at least nt description tokens with
a_norm > Tt; `>=` for both when `classify.strict` is false), and typed visual / text /
multimodal / unknown. The fractions of the four types over the neuron's top samples give
the category (argmax, ties broken by `classify.tie_break`) and the confidence (the winning
fraction); the neuron is high-confidence when the confidence exceeds `classify.confidence`.

"At least n tokens above T" holds exactly when the n-th largest activation is above T, so
the test reads one order statistic per modality from the state. A sample with fewer than n
positions of a modality has no n-th value (-inf in the state) and never passes, whatever
the threshold.

Edge cases, by rule:
- a dead neuron (max <= 0 over the corpus) normalises to 0 everywhere: all its samples are
  `unknown` (even under a threshold of 0 with `>=`), its category is `unknown`, and `dead`
  is true;
- a neuron with fewer than N top samples (a corpus smaller than N) takes its fractions
  over the samples it has (`n_top`); with none at all it is `unknown` with every
  fraction and the confidence 0.

Optional significance test (`classify.significance`), see :func:`significance_test`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from builder.capture.stage import STATE_FILE
from builder.capture.state import NEG_INF, NeuronState
from builder.config import ClassifyConfig
from builder.corpus.stage import read_samples
from builder.io import write_parquet
from builder.progress import progress
from builder.run import RunContext

CATEGORIES = ("visual", "text", "multimodal", "unknown")

# Sample type from (visual-activated, text-activated) as the code vis + 2 * txt.
_TYPE_OF_CODE = torch.tensor([CATEGORIES.index(c) for c in ("unknown", "visual", "text", "multimodal")],
                             dtype=torch.int8)


@dataclass
class Classification:
    """Per-neuron results, arrays of shape [L, D] (or [L, D, ...] where noted)."""

    category: np.ndarray
    """int8 index into CATEGORIES."""
    fractions: np.ndarray
    """float32 [L, D, 4]: p_visual, p_text, p_multimodal, p_unknown."""
    counts: np.ndarray
    """int32 [L, D, 4]: top samples of each type (fractions = counts / n_top)."""
    confidence: np.ndarray
    """float32: the winning fraction."""
    high_confidence: np.ndarray
    """bool: confidence > classify.confidence."""
    n_top: np.ndarray
    """int32: top samples the fractions are over."""
    dead: np.ndarray
    """bool: max activation <= 0."""
    sample_type: np.ndarray
    """int8 [L, D, N]: type of each top sample (index into CATEGORIES), -1 for empty slots."""


def normalise(values: torch.Tensor, neuron_max: torch.Tensor) -> torch.Tensor:
    """METHOD.md 3: clip(a / max * 10, 0, 10); 0 for dead neurons. `neuron_max` broadcasts."""
    live = neuron_max > 0
    safe_max = torch.where(live, neuron_max, torch.ones_like(neuron_max))
    out = (values / safe_max * 10).clamp(0, 10)
    out = torch.where(live, out, torch.zeros_like(out))
    return torch.nan_to_num(out, nan=0.0, neginf=0.0)


def _above(x: torch.Tensor, threshold: float, strict: bool) -> torch.Tensor:
    return x > threshold if strict else x >= threshold


def _order_statistic(top: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th largest value (1-based) of every top sample, as a contiguous [L, D, N]."""
    return top[..., rank - 1].contiguous()


def sample_levels(state: NeuronState, cfg: ClassifyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Each top sample's visual and text level on the 0-10 scale: [L, D, N] each.

    The visual level is the normalised nv-th largest visual activation: the highest
    threshold at which the sample still counts as visual-activated. Likewise for text with
    nt. A missing order statistic (fewer positions than n) gives level 0.
    """
    mx = state.max_all[..., None]
    visual = normalise(_order_statistic(state.top_visual, cfg.visual_min_tokens), mx)
    text = normalise(_order_statistic(state.top_text, cfg.text_min_tokens), mx)
    return visual, text


def classify_state(state: NeuronState, cfg: ClassifyConfig) -> Classification:
    """Categories of every neuron (vectorised over all neurons at once)."""
    L, D, N, m = state.shape
    need = max(cfg.visual_min_tokens, cfg.text_min_tokens)
    if m < need:
        raise ValueError(f"the state keeps {m} order statistics; classify needs {need} (capture.top_m)")
    mx = state.max_all[..., None]
    live = mx > 0
    valid = state.top_sample >= 0
    on = []
    for top, n, threshold in ((state.top_visual, cfg.visual_min_tokens, cfg.visual_threshold),
                              (state.top_text, cfg.text_min_tokens, cfg.text_threshold)):
        raw = _order_statistic(top, n)
        # The n-th largest value exceeds T exactly when at least n values exceed T; a missing
        # n-th value (-inf) means fewer than n tokens, and a dead neuron activates nothing.
        on.append(_above(normalise(raw, mx), threshold, cfg.strict) & (raw > NEG_INF) & live)
    code = on[0].to(torch.int8) + 2 * on[1].to(torch.int8)
    sample_type = torch.where(valid, _TYPE_OF_CODE[code.long()], torch.tensor(-1, dtype=torch.int8))
    counts = torch.stack([(sample_type == c).sum(-1, dtype=torch.int32) for c in range(len(CATEGORIES))], dim=-1)
    n_top = valid.sum(-1, dtype=torch.int32)
    fractions = counts.float() / n_top.clamp(min=1)[..., None]
    order = [CATEGORIES.index(c) for c in cfg.tie_break]
    # argmax returns the first maximum: look at the categories in tie-break order. Counts are
    # compared (integers), so equal fractions are exactly equal.
    winner_in_order = counts[..., order].argmax(-1)
    category = torch.tensor(order)[winner_in_order]
    # No sample at all (an empty corpus): nothing won; unknown with every fraction 0.
    category = torch.where(n_top > 0, category, CATEGORIES.index("unknown"))
    confidence = fractions.gather(-1, category[..., None])[..., 0]
    return Classification(
        category=category.numpy().astype(np.int8),
        fractions=fractions.numpy(),
        counts=counts.numpy(),
        confidence=confidence.numpy(),
        high_confidence=(confidence > cfg.confidence).numpy(),
        n_top=n_top.numpy(),
        dead=(state.max_all <= 0).numpy(),
        sample_type=sample_type.numpy(),
    )


# -- significance ----------------------------------------------------------------------

SIGNIFICANCE_COLUMNS: dict[str, tuple[str, str]] = {
    "visual_minus_text": (
        "float32",
        "Mean over the top samples of (visual level - text level), 0-10 scale; the level of a "
        "modality is the normalised nv-th (visual) or nt-th (text) largest activation.",
    ),
    "p_value_visual_vs_text": (
        "float32",
        "Two-sided sign-flip permutation p-value of visual_minus_text = 0 over the top samples.",
    ),
    "p_value_category": (
        "float32",
        "Exact sign-test p-value that the winning sample type outnumbers the runner-up type.",
    ),
}
"""Extra `neurons` columns written when `classify.significance` is on: name -> (dtype, meaning)."""


def significance_features() -> dict[str, Any]:
    """The extra columns as `datasets` features, for the package to merge when present."""
    from datasets import Value

    return {name: Value(dtype) for name, (dtype, _) in SIGNIFICANCE_COLUMNS.items()}


@dataclass
class Significance:
    """Per-neuron significance results, arrays of shape [L, D]."""

    visual_minus_text: np.ndarray
    """float32: mean paired difference of visual and text level over the top samples."""
    p_value_visual_vs_text: np.ndarray
    """float32: two-sided sign-flip permutation p-value of that difference."""
    p_value_category: np.ndarray
    """float32: exact sign-test p-value of the winning sample type against the runner-up."""
    permutations: int
    """Sign patterns used: 2^n when all were enumerated (exact), else `classify.permutations`."""
    exact: bool
    """True when every sign pattern was enumerated (then the p-value is exact)."""


def sign_patterns(n: int, permutations: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """±1 sign patterns over n paired samples, float32 [P, n], and whether they are all of them.

    All 2^n patterns when there are no more than `permutations` of them (an exact test),
    else `permutations` patterns drawn from `rng`.
    """
    if n == 0:
        return np.ones((1, 0), dtype=np.float32), True
    if 2**n <= permutations:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        return (1 - 2 * bits).astype(np.float32), True
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(permutations, n)), False


def binomial_upper_tail(n_max: int) -> np.ndarray:
    """tail[n, k] = P(Binomial(n, 1/2) >= k), float64 [n_max + 1, n_max + 2], exact sums."""
    from math import comb

    tail = np.zeros((n_max + 1, n_max + 2))
    for n in range(n_max + 1):
        acc = 0
        for k in range(n, -1, -1):
            acc += comb(n, k)
            tail[n, k] = acc / 2**n
    return tail


def significance_test(
    state: NeuronState,
    cfg: ClassifyConfig,
    result: Classification,
    rng: np.random.Generator,
    chunk_rows: int = 16_384,
) -> Significance:
    """A threshold-free test of each neuron's modality preference, and of its category decision.

    What is tested, per neuron, over its top-N samples (the samples its category is read from):

    1. `p_value_visual_vs_text`: for top sample i, d_i = visual level - text level, where the
       visual level is the normalised nv-th largest visual activation (the highest threshold
       at which the sample would still be visual-activated) and the text level the normalised
       nt-th largest text activation. H0: within each sample the two levels are
       exchangeable, i.e. d_i is symmetric about 0 (the neuron does not prefer one modality).
       Statistic: |sum_i d_i|. Null distribution: the same sum with every sign pattern
       (exact, when 2^n <= `classify.permutations`) or with `classify.permutations` random
       sign patterns; p = (1 + #{|perm| >= |obs|}) / (1 + P) (the `1 +` keeps a sampled
       p-value valid). Samples are the exchangeable units (tokens within a sample are
       correlated), and the top-N selection by the sample's max over both modalities is
       symmetric in the modalities, so it does not break H0. The same sign patterns serve
       every neuron: each neuron's p-value is valid on its own, and the whole model runs as a
       few matrix products.
    2. `p_value_category`: H0: the winning sample type and the runner-up are equally likely.
       Given the n samples of either type, the winner's count is Binomial(n, 1/2) under H0
       (the permutation distribution of swapping the two labels), and the p-value is
       P(X >= winner's count), exact. Equal counts give p >= 0.5.

    Why this answers the fixed-threshold critique: the category rule asks whether each
    modality crosses a fixed threshold (Tv, Tt), so a neuron at 10 on image patches and 3.5 on
    words is "multimodal". Test 1 uses no threshold: a small p-value with a large
    `visual_minus_text` says the neuron prefers one modality even when both cross the
    thresholds, and a multimodal neuron with a large p-value responds to both alike. Test 2
    says whether the argmax itself is more than a coin flip between two types. Filter with a
    multiple-testing correction over the neurons you keep (e.g. Benjamini-Hochberg); sampled
    p-values are never below 1 / (P + 1).
    """
    visual, text = sample_levels(state, cfg)
    valid = state.top_sample >= 0
    d = torch.where(valid, visual - text, torch.zeros_like(visual)).numpy().astype(np.float32)
    L, D, N = d.shape
    n_top = result.n_top.reshape(-1)
    rows = d.reshape(L * D, N)
    # Only the first max(n_top) slots hold samples (empty slots sort last and have d = 0).
    width = int(n_top.max(initial=0))
    rows = rows[:, :width]
    signs, exact = sign_patterns(width, cfg.permutations, rng)
    signs_t = np.ascontiguousarray(signs.T)  # [n, P]
    n_perm = signs_t.shape[1]
    obs = rows.sum(axis=1, dtype=np.float64)
    # Rounding tolerance: a permuted sum equal to the observed one in exact arithmetic must count.
    tol = 1e-5 * np.abs(rows).sum(axis=1, dtype=np.float64) + 1e-12
    exceed = np.empty(L * D, dtype=np.int64)
    with progress() as bar:
        task = bar.add_task("significance neurons", total=L * D)
        for start in range(0, L * D, chunk_rows):
            stop = min(start + chunk_rows, L * D)
            perm = rows[start:stop] @ signs_t  # [rows, P]
            np.abs(perm, out=perm)
            threshold = (np.abs(obs[start:stop]) - tol[start:stop]).astype(np.float32)
            exceed[start:stop] = (perm >= threshold[:, None]).sum(axis=1)
            bar.advance(task, stop - start)
    if exact:
        p_pair = exceed / n_perm
    else:
        p_pair = (1 + exceed) / (1 + n_perm)
    mean_d = np.where(n_top > 0, obs / np.maximum(n_top, 1), 0.0)
    return Significance(
        visual_minus_text=mean_d.reshape(L, D).astype(np.float32),
        p_value_visual_vs_text=np.minimum(p_pair, 1.0).reshape(L, D).astype(np.float32),
        p_value_category=category_p_values(result).astype(np.float32),
        permutations=n_perm,
        exact=exact,
    )


def category_p_values(result: Classification) -> np.ndarray:
    """Exact sign test of the winning sample type against the runner-up, [L, D]."""
    counts = result.counts.astype(np.int64)
    winner = np.take_along_axis(counts, result.category[..., None].astype(np.int64), axis=-1)[..., 0]
    others = counts.copy()
    np.put_along_axis(others, result.category[..., None].astype(np.int64), -1, axis=-1)
    runner_up = others.max(axis=-1)
    tail = binomial_upper_tail(int(result.n_top.max(initial=0)))
    return tail[winner + runner_up, winner]


# -- tables ----------------------------------------------------------------------------


def neuron_table(
    state: NeuronState, result: Classification, sample_ids: list[str], significance: Significance | None = None
) -> pa.Table:
    """One row per (layer, neuron): the `neurons` config's columns (+ significance columns)."""
    L, D, N, _ = state.shape
    layer = np.repeat(np.arange(L, dtype=np.int32), D)
    neuron = np.tile(np.arange(D, dtype=np.int32), L)
    vc = state.visual_count.double().clamp(min=1)[:, None]
    tc = state.text_count.double().clamp(min=1)[:, None]
    mean_visual = (state.visual_sum / vc).float().numpy().reshape(-1)
    mean_text = (state.text_sum / tc).float().numpy().reshape(-1)
    max_act = torch.nan_to_num(state.max_all, neginf=0.0).numpy().reshape(-1)
    # top_sample_ids as one list array built from offsets (no per-row Python lists).
    top = state.top_sample.reshape(L * D, N).numpy()
    lengths = (top >= 0).sum(axis=1)
    offsets = np.zeros(L * D + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = top[top >= 0]
    top_ids = pa.LargeListArray.from_arrays(offsets, pa.array(sample_ids, pa.string()).take(flat)).cast(
        pa.list_(pa.string())
    )
    frac = result.fractions.reshape(L * D, 4)
    names = pa.array(list(CATEGORIES), pa.string())
    columns: dict[str, Any] = {
        "layer": layer,
        "neuron": neuron,
        "category": names.take(result.category.reshape(-1).astype(np.int64)),
        "p_visual": frac[:, 0],
        "p_text": frac[:, 1],
        "p_multimodal": frac[:, 2],
        "p_unknown": frac[:, 3],
        "confidence": result.confidence.reshape(-1),
        "high_confidence": result.high_confidence.reshape(-1),
        "max_activation": max_act.astype(np.float32),
        "mean_visual": mean_visual,
        "mean_text": mean_text,
        "n_top": result.n_top.reshape(-1).astype(np.int32),
        "dead": result.dead.reshape(-1),
        "top_sample_ids": top_ids,
    }
    for name, (dtype, _) in SIGNIFICANCE_COLUMNS.items():
        # Null when the test was not run: the published schema does not depend on the option.
        columns[name] = (pa.array(getattr(significance, name).reshape(-1)) if significance is not None
                         else pa.nulls(L * D, pa.float32()))
    return pa.table(columns)


def layer_table(neurons: pa.Table) -> pa.Table:
    """One row per layer: counts and fractions per category, high-confidence counts."""
    layer = neurons.column("layer").to_numpy()
    category = np.asarray(neurons.column("category").to_pylist(), dtype=object)
    high = neurons.column("high_confidence").to_numpy(zero_copy_only=False)
    rows = []
    for value in np.unique(layer):
        here = layer == value
        row: dict[str, float | int] = {"layer": int(value), "neurons": int(here.sum())}
        for c in CATEGORIES:
            in_c = here & (category == c)
            row[f"n_{c}"] = int(in_c.sum())
            row[f"frac_{c}"] = float(in_c.sum() / here.sum())
            row[f"n_high_confidence_{c}"] = int((in_c & high).sum())
        row["n_high_confidence"] = int((here & high).sum())
        rows.append(row)
    return pa.Table.from_pylist(rows)


class ClassifyStage:
    name = "classify"
    version = "3"
    sections = ("classify",)

    def source_fingerprint(self, ctx: RunContext) -> str:
        return ""

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.neurons, ctx.run_dir.layers]

    def run(self, ctx: RunContext) -> dict[str, int]:
        cfg = ctx.recipe.classify
        state = NeuronState.load(ctx.run_dir.capture_dir / STATE_FILE)
        result = classify_state(state, cfg)
        significance = None
        if cfg.significance:
            significance = significance_test(state, cfg, result, np.random.default_rng(cfg.seed))
        sample_ids = [s.sample_id for s in read_samples(ctx.run_dir.samples)]
        neurons = neuron_table(state, result, sample_ids, significance)
        write_parquet(ctx.run_dir.neurons, neurons)
        write_parquet(ctx.run_dir.layers, layer_table(neurons))
        counts = {"neurons": neurons.num_rows, "high_confidence": int(result.high_confidence.sum()),
                  "dead": int(result.dead.sum())}
        for i, c in enumerate(CATEGORIES):
            counts[c] = int((result.category == i).sum())
        if significance is not None:
            counts["significance_permutations"] = significance.permutations
        return counts


def read_neurons(path: Path) -> pa.Table:
    return pq.read_table(path)
