"""The classify stage: METHOD.md section 4 applied, exactly, to the capture state.

Per neuron, every top-N sample is normalised by the neuron's global max
(`a_norm = clip(a / max * 10, 0, 10)`), tested for visual activation (at least nv visual
tokens with a_norm > Tv) and text activation (at least nt description tokens with
a_norm > Tt), and typed visual / text / multimodal / unknown. The fractions of the four
types over the neuron's top samples give the category (argmax, ties broken by
`classify.tie_break`) and the confidence (the winning fraction).

Edge cases, by rule:
- a dead neuron (max <= 0 over the corpus) normalises to 0 everywhere: all its samples are
  `unknown`, its category is `unknown`, and `dead` is true;
- a neuron with fewer than N top samples (a corpus smaller than N) takes its fractions
  over the samples it has (`n_top`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from builder.capture.stage import STATE_FILE
from builder.capture.state import NeuronState
from builder.config import ClassifyConfig
from builder.corpus.stage import read_samples
from builder.io import write_parquet
from builder.run import RunContext

CATEGORIES = ("visual", "text", "multimodal", "unknown")


@dataclass
class Classification:
    """Per-neuron results, arrays of shape [L, D] (or [L, D, N] where noted)."""

    category: np.ndarray
    """int8 index into CATEGORIES."""
    fractions: np.ndarray
    """float32 [L, D, 4]: p_visual, p_text, p_multimodal, p_unknown."""
    confidence: np.ndarray
    """float32: the winning fraction."""
    high_confidence: np.ndarray
    """bool: confidence > classify.confidence."""
    n_top: np.ndarray
    """int: top samples the fractions are over."""
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


def classify_state(state: NeuronState, cfg: ClassifyConfig) -> Classification:
    """Categories of every neuron (vectorised over all neurons at once)."""
    L, D, N, m = state.shape
    need = max(cfg.visual_min_tokens, cfg.text_min_tokens)
    if m < need:
        raise ValueError(f"the state keeps {m} order statistics; classify needs {need} (capture.top_m)")
    mx = state.max_all[..., None, None]  # [L, D, 1, 1]
    nv_th = normalise(state.top_visual[..., cfg.visual_min_tokens - 1 : cfg.visual_min_tokens], mx)[..., 0]
    nt_th = normalise(state.top_text[..., cfg.text_min_tokens - 1 : cfg.text_min_tokens], mx)[..., 0]
    # The n-th largest value exceeds T exactly when at least n values exceed T.
    vis_on = _above(nv_th, cfg.visual_threshold, cfg.strict)  # [L, D, N]
    txt_on = _above(nt_th, cfg.text_threshold, cfg.strict)
    valid = state.top_sample >= 0
    types = torch.stack([vis_on & ~txt_on, ~vis_on & txt_on, vis_on & txt_on, ~vis_on & ~txt_on], dim=-1)
    types = types & valid[..., None]
    n_top = valid.sum(-1)
    counts = types.sum(dim=2).float()  # [L, D, 4]
    fractions = counts / n_top.clamp(min=1)[..., None]
    order = [CATEGORIES.index(c) for c in cfg.tie_break]
    # argmax returns the first maximum: look at the categories in tie-break order.
    winner_in_order = fractions[..., order].argmax(-1)
    category = torch.tensor(order)[winner_in_order]
    confidence = fractions.gather(-1, category[..., None])[..., 0]
    sample_type = torch.where(valid, types.float().argmax(-1), torch.full_like(n_top[..., None].expand(-1, -1, N), -1))
    return Classification(
        category=category.numpy().astype(np.int8),
        fractions=fractions.numpy().astype(np.float32),
        confidence=confidence.numpy().astype(np.float32),
        high_confidence=(confidence > cfg.confidence).numpy(),
        n_top=n_top.numpy(),
        dead=(state.max_all <= 0).numpy(),
        sample_type=sample_type.numpy().astype(np.int8),
    )


def neuron_table(state: NeuronState, result: Classification, sample_ids: list[str]) -> pa.Table:
    """One row per (layer, neuron): the `neurons` config's columns."""
    L, D, N, _ = state.shape
    layer = np.repeat(np.arange(L, dtype=np.int32), D)
    neuron = np.tile(np.arange(D, dtype=np.int32), L)
    vc = state.visual_count.double().clamp(min=1)[:, None]
    tc = state.text_count.double().clamp(min=1)[:, None]
    mean_visual = (state.visual_sum / vc).float().numpy().reshape(-1)
    mean_text = (state.text_sum / tc).float().numpy().reshape(-1)
    max_act = torch.nan_to_num(state.max_all, neginf=0.0).numpy().reshape(-1)
    ids = np.asarray(sample_ids, dtype=object)
    top = state.top_sample.reshape(L * D, N).numpy()
    top_ids = [ids[row[row >= 0]].tolist() for row in top]
    frac = result.fractions.reshape(L * D, 4)
    return pa.table(
        {
            "layer": layer,
            "neuron": neuron,
            "category": pa.array(np.asarray(CATEGORIES, dtype=object)[result.category.reshape(-1)].tolist(), pa.string()),
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
            "top_sample_ids": pa.array(top_ids, pa.list_(pa.string())),
        }
    )


def layer_table(neurons: pa.Table) -> pa.Table:
    """One row per layer: counts and fractions per category, high-confidence counts."""
    df = neurons.select(["layer", "category", "high_confidence"]).to_pandas()
    rows = []
    for layer, g in df.groupby("layer", sort=True):
        row: dict[str, float | int] = {"layer": int(layer), "neurons": len(g)}
        for c in CATEGORIES:
            in_c = g["category"] == c
            row[f"n_{c}"] = int(in_c.sum())
            row[f"frac_{c}"] = float(in_c.mean())
            row[f"n_high_confidence_{c}"] = int((in_c & g["high_confidence"]).sum())
        row["n_high_confidence"] = int(g["high_confidence"].sum())
        rows.append(row)
    return pa.Table.from_pylist(rows)


class ClassifyStage:
    name = "classify"
    version = "1"
    sections = ("classify",)

    def source_fingerprint(self, ctx: RunContext) -> str:
        return ""

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.neurons, ctx.run_dir.layers]

    def run(self, ctx: RunContext) -> dict[str, int]:
        state = NeuronState.load(ctx.run_dir.capture_dir / STATE_FILE)
        result = classify_state(state, ctx.recipe.classify)
        sample_ids = [s.sample_id for s in read_samples(ctx.run_dir.samples)]
        neurons = neuron_table(state, result, sample_ids)
        write_parquet(ctx.run_dir.neurons, neurons)
        write_parquet(ctx.run_dir.layers, layer_table(neurons))
        counts = {"neurons": neurons.num_rows, "high_confidence": int(result.high_confidence.sum()),
                  "dead": int(result.dead.sum())}
        for i, c in enumerate(CATEGORIES):
            counts[c] = int((result.category == i).sum())
        return counts


def read_neurons(path: Path) -> pa.Table:
    return pq.read_table(path)
