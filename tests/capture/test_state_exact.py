"""The streaming state against a brute-force computation on stored full activations.

The tiny model runs over a small corpus with hooks that keep every activation; every
statistic of the state, and every neuron's category, is then recomputed directly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from builder.capture.hooks import neuron_hooks
from builder.capture.inputs import encode_batch
from builder.capture.state import NeuronState
from builder.classify import CATEGORIES, classify_state
from builder.config import ClassifyConfig
from builder.corpus.shapes import shape_sample

PROMPT = "Could you describe the image?"
N_SAMPLES = 11
BATCH = 4
TOP_N = 5
TOP_M = 6


def _run(vlm, hook: str):
    """Stream the corpus through the state and keep every activation alongside."""
    mlps = vlm.mlps()
    state = NeuronState.empty(len(mlps), mlps[0].width, TOP_N, TOP_M)
    full: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {m.layer: [] for m in mlps}
    extra: dict[str, list] = {"gate_up": []}
    current = {}

    def sink(layer: int, acts: torch.Tensor) -> None:
        b = current["batch"]
        state.update_layer(layer, acts, b.visual_mask, b.text_mask, b.sample_index)
        for row in range(acts.shape[0]):
            vis = acts[row][b.visual_mask[row]].clone()
            txt = acts[row][b.text_mask[row]].clone()
            full[layer].append((vis, txt))

    samples = [shape_sample(i) for i in range(N_SAMPLES)]
    # Vary description lengths so padding differs within a batch.
    descriptions = [c if i % 3 else c + " and a small " + c for i, (_, c) in enumerate(samples)]
    with neuron_hooks(mlps, hook, sink), torch.inference_mode():
        for start in range(0, N_SAMPLES, BATCH):
            idx = list(range(start, min(start + BATCH, N_SAMPLES)))
            batch = encode_batch(vlm.processor, [samples[i][0] for i in idx], [descriptions[i] for i in idx],
                                 PROMPT, vlm.image_token_id, idx)
            current["batch"] = batch
            vlm.model.model(**batch.inputs)
    return state, full


def _topm(values: torch.Tensor, m: int) -> torch.Tensor:
    out = torch.full((m,) + values.shape[1:], float("-inf"))
    top = values.sort(dim=0, descending=True).values[:m]
    out[: top.shape[0]] = top
    return out


@pytest.mark.parametrize("hook", ["act_fn", "down_proj_input"])
def test_state_equals_brute_force(tiny_vlm, hook: str) -> None:
    state, full = _run(tiny_vlm, hook)
    L, D, N, m = state.shape
    for layer in range(L):
        vis_all = torch.cat([v for v, _ in full[layer]])  # [positions, D]
        txt_all = torch.cat([t for _, t in full[layer]])
        assert int(state.visual_count[layer]) == vis_all.shape[0] == N_SAMPLES * 36
        assert int(state.text_count[layer]) == txt_all.shape[0]
        torch.testing.assert_close(state.visual_sum[layer], vis_all.double().sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state.text_sum[layer], txt_all.double().sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state.visual_sumsq[layer], (vis_all.double() ** 2).sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state.text_sumsq[layer], (txt_all.double() ** 2).sum(0), rtol=1e-6, atol=1e-6)
        assert torch.equal(state.visual_positive[layer], (vis_all > 0).sum(0))
        assert torch.equal(state.text_positive[layer], (txt_all > 0).sum(0))
        assert torch.equal(state.visual_max[layer], vis_all.max(0).values)
        assert torch.equal(state.text_max[layer], txt_all.max(0).values)
        assert torch.equal(state.max_all[layer], torch.maximum(vis_all.max(0).values, txt_all.max(0).values))
        # Per-sample maxima and the top-N (value descending, then sample index ascending).
        sample_max = torch.stack([torch.maximum(v.max(0).values, t.max(0).values) for v, t in full[layer]])
        for d in range(D):
            ranked = sorted(range(N_SAMPLES), key=lambda s: (-float(sample_max[s, d]), s))[:N]
            assert state.top_sample[layer, d].tolist() == ranked
            assert torch.equal(state.top_value[layer, d], sample_max[ranked, d])
            for slot, s in enumerate(ranked):
                vis, txt = full[layer][s]
                assert torch.equal(state.top_visual[layer, d, slot], _topm(vis[:, d], m))
                assert torch.equal(state.top_text[layer, d, slot], _topm(txt[:, d], m))


def test_down_proj_input_is_gate_times_up(tiny_vlm) -> None:
    mlp = tiny_vlm.mlps()[1].module
    seen = {}
    with neuron_hooks(tiny_vlm.mlps()[1:2], "down_proj_input", lambda layer, a: seen.setdefault("down", a.clone())):
        with neuron_hooks(tiny_vlm.mlps()[1:2], "act_fn", lambda layer, a: seen.setdefault("act", a.clone())):
            x = torch.randn(2, 5, mlp.gate_proj.in_features)
            with torch.inference_mode():
                mlp(x)
    expected = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    torch.testing.assert_close(seen["down"], expected)
    torch.testing.assert_close(seen["act"], torch.nn.functional.silu(mlp.gate_proj(x)))


def _brute_categories(full, max_all: torch.Tensor, top_sample: torch.Tensor, cfg: ClassifyConfig) -> np.ndarray:
    """METHOD.md section 4 on full activations: count normalised tokens above thresholds."""
    L, D, N = top_sample.shape
    out = np.zeros((L, D), dtype=np.int8)
    above = (lambda x, t: x > t) if cfg.strict else (lambda x, t: x >= t)
    for layer, d in itertools.product(range(L), range(D)):
        mx = float(max_all[layer, d])
        counts = np.zeros(4)
        for s in top_sample[layer, d].tolist():
            vis, txt = full[layer][s]
            if mx > 0:
                nv = (vis[:, d] / mx * 10).clamp(0, 10)
                nt = (txt[:, d] / mx * 10).clamp(0, 10)
            else:
                nv, nt = torch.zeros(vis.shape[0]), torch.zeros(txt.shape[0])
            v_on = int(above(nv, cfg.visual_threshold).sum()) >= cfg.visual_min_tokens
            t_on = int(above(nt, cfg.text_threshold).sum()) >= cfg.text_min_tokens
            counts[2 if v_on and t_on else 0 if v_on else 1 if t_on else 3] += 1
        fractions = counts / counts.sum()
        order = [CATEGORIES.index(c) for c in cfg.tie_break]
        out[layer, d] = order[int(np.argmax(fractions[order]))]
    return out


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the paper's thresholds
        {"visual_threshold": 1.0, "visual_min_tokens": 2, "text_threshold": 1.5, "text_min_tokens": 1},
        {"visual_threshold": 5.0, "visual_min_tokens": 6, "text_threshold": 6.0, "text_min_tokens": 3, "strict": False},
        {"visual_threshold": 0.0, "visual_min_tokens": 1, "text_threshold": 0.0, "text_min_tokens": 1,
         "tie_break": ["unknown", "multimodal", "text", "visual"]},
    ],
)
def test_categories_from_state_equal_brute_force(tiny_vlm, settings: dict) -> None:
    state, full = _run(tiny_vlm, "act_fn")
    cfg = ClassifyConfig(top_n=TOP_N, **settings)
    result = classify_state(state, cfg)
    expected = _brute_categories(full, state.max_all, state.top_sample, cfg)
    assert np.array_equal(result.category, expected)
    # Not a degenerate check: several categories occur.
    assert len(np.unique(expected)) >= 2
