"""The streaming state against a brute-force computation on stored full activations.

The capture stage runs over a small corpus while hooks owned by this test keep every
activation of every layer (and every MLP input); every statistic of the state, and every
neuron's category under several threshold settings, is then recomputed directly from them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import builder.capture.state as state_module
from builder.capture.stage import BatchEncoder, Shard, capture_shard
from builder.capture.state import BatchPositions, NeuronState, WorkBuffer
from builder.classify import CATEGORIES, classify_state
from builder.config import ClassifyConfig, load_recipe
from builder.pipeline import default_stages
from builder.run import Executor

N_SAMPLES = 14
BATCH = 4
TOP_N = 5
TOP_M = 10
U32 = 2.0**-24  # unit roundoff of float32


@dataclass
class Recorded:
    """What the test's own hooks saw in the capture pass."""

    state: NeuronState
    hook: str
    vis: dict[int, list[torch.Tensor]]
    """layer -> per sample (corpus order) its visual activations [positions, D]."""
    txt: dict[int, list[torch.Tensor]]
    """layer -> per sample its description activations [positions, D]."""
    seq_len: int
    """Longest padded sequence of any batch (bounds the float32 summation error)."""


def _capture_with_full_activations(tmp_path: Path, hook: str) -> Recorded:
    recipe = load_recipe("tiny", [f"corpus.size={N_SAMPLES}", f"classify.top_n={TOP_N}", f"capture.top_m={TOP_M}",
                                  f"capture.batch_size={BATCH}", f"capture.hook={hook}", "capture.checkpoint_every=1"])
    ex = Executor(recipe, tmp_path, default_stages())
    ex.run(until="text")
    vlm = ex.ctx.vlm
    mlps = vlm.mlps()
    seen: dict[str, dict[int, list[torch.Tensor]]] = {k: {m.layer: [] for m in mlps} for k in ("x", "act", "down")}
    handles = []
    for m in mlps:
        handles += [
            m.module.register_forward_pre_hook(lambda _m, inp, i=m.layer: seen["x"][i].append(inp[0].clone())),
            m.module.act_fn.register_forward_hook(lambda _m, _i, out, i=m.layer: seen["act"][i].append(out.clone())),
            m.module.down_proj.register_forward_pre_hook(
                lambda _m, inp, i=m.layer: seen["down"][i].append(inp[0].clone())),
        ]
    try:
        state = capture_shard(ex.ctx, Shard(0, 1), tmp_path / "capture" / "shard.safetensors")
    finally:
        for h in handles:
            h.remove()
    order = list(range(N_SAMPLES))
    batches = [order[i : i + BATCH] for i in range(0, N_SAMPLES, BATCH)]
    encoder = BatchEncoder(ex.ctx, batches)
    full = seen["act" if hook == "act_fn" else "down"]
    vis = {m.layer: [] for m in mlps}
    txt = {m.layer: [] for m in mlps}
    seq_len = 0
    with torch.inference_mode():
        for b, idx in enumerate(batches):
            batch = encoder[b]
            seq_len = max(seq_len, batch.visual_mask.shape[1])
            assert batch.sample_index.tolist() == idx
            for m in mlps:
                x = seen["x"][m.layer][b]
                gate, up = m.module.gate_proj(x), m.module.up_proj(x)
                # The two hook points are what METHOD.md says they are, computed by hand.
                torch.testing.assert_close(seen["act"][m.layer][b], F.silu(gate), rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(seen["down"][m.layer][b], F.silu(gate) * up, rtol=1e-6, atol=1e-7)
                for row in range(len(idx)):
                    vis[m.layer].append(full[m.layer][b][row][batch.visual_mask[row]])
                    txt[m.layer].append(full[m.layer][b][row][batch.text_mask[row]])
    return Recorded(state, hook, vis, txt, seq_len)


@pytest.fixture(scope="module", params=["act_fn", "down_proj_input"])
def recorded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, builder_cache) -> Recorded:
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "down_proj_input":
            # The moments in slices of 8 positions (the CPU path for large models), not one.
            mp.setattr(state_module, "CPU_SLICE_BYTES", 1)
        return _capture_with_full_activations(tmp_path_factory.mktemp(request.param), request.param)


def _top_m(values: torch.Tensor, m: int) -> torch.Tensor:
    """The m largest of a 1-D tensor, descending, -inf padded."""
    out = torch.full((m,), float("-inf"))
    top = values.sort(descending=True).values[:m]
    out[: top.shape[0]] = top
    return out


def _ranked(sample_max: torch.Tensor, n: int) -> list[int]:
    """Top-n sample indices by value descending, then sample index ascending."""
    return sorted(range(sample_max.shape[0]), key=lambda s: (-float(sample_max[s]), s))[:n]


def _sample_max(rec: Recorded, layer: int) -> torch.Tensor:
    """[samples, D]: each sample's max over its visual and description positions."""
    neg = torch.tensor(float("-inf"))
    return torch.stack([
        torch.maximum(v.max(0).values if len(v) else neg, t.max(0).values if len(t) else neg)
        for v, t in zip(rec.vis[layer], rec.txt[layer])
    ])


def test_every_statistic_equals_brute_force(recorded: Recorded) -> None:
    state = recorded.state
    L, D, N, m = state.shape
    assert (N, m) == (TOP_N, TOP_M)
    dead_ties = 0
    for layer in range(L):
        vis_all = torch.cat(recorded.vis[layer])  # [positions, D]
        txt_all = torch.cat(recorded.txt[layer])
        assert int(state.visual_count[layer]) == vis_all.shape[0] == N_SAMPLES * 36
        assert int(state.text_count[layer]) == txt_all.shape[0] > N_SAMPLES
        # Sums: float32 per-batch partial sums accumulated in float64; the error is within
        # the float32 bound for sums of seq_len terms, gamma_T * sum|a| (Higham).
        gamma = recorded.seq_len * U32 / (1 - recorded.seq_len * U32)
        for got, values in ((state.visual_sum, vis_all), (state.text_sum, txt_all)):
            exact = values.double().sum(0)
            assert ((got[layer] - exact).abs() <= gamma * values.double().abs().sum(0) + 1e-30).all()
        for got, values in ((state.visual_sumsq, vis_all), (state.text_sumsq, txt_all)):
            sq = values.double() ** 2
            assert ((got[layer] - sq.sum(0)).abs() <= (gamma + 2 * U32) * sq.sum(0) + 1e-30).all()
        # Counts and maxima: exact.
        assert torch.equal(state.visual_positive[layer], (vis_all > 0).sum(0))
        assert torch.equal(state.text_positive[layer], (txt_all > 0).sum(0))
        assert torch.equal(state.visual_max[layer], vis_all.max(0).values)
        assert torch.equal(state.text_max[layer], txt_all.max(0).values)
        assert torch.equal(state.max_all[layer], torch.maximum(vis_all.max(0).values, txt_all.max(0).values))
        # Top-N (value descending, then sample index ascending) and each top sample's top-m.
        sample_max = _sample_max(recorded, layer)
        for d in range(D):
            ranked = _ranked(sample_max[:, d], N)
            assert state.top_sample[layer, d].tolist() == ranked, (layer, d)
            assert torch.equal(state.top_value[layer, d], sample_max[ranked, d])
            dead_ties += int(len(set(sample_max[:, d].tolist())) < N_SAMPLES)
            for slot, s in enumerate(ranked):
                assert torch.equal(state.top_visual[layer, d, slot], _top_m(recorded.vis[layer][s][:, d], m))
                assert torch.equal(state.top_text[layer, d, slot], _top_m(recorded.txt[layer][s][:, d], m))
    # Description lengths differ, so some samples have fewer than m description tokens
    # (-inf padded order statistics), and some neurons rank tied samples (tie rule exercised).
    assert any(len(t) < TOP_M for t in recorded.txt[0])
    assert dead_ties > 0


def _brute_categories(rec: Recorded, cfg: ClassifyConfig) -> tuple[np.ndarray, np.ndarray]:
    """METHOD.md section 4 from the full activations: normalise, count tokens above T.

    Returns the category [L, D] and the per-type counts [L, D, 4]. Dead neurons (max <= 0)
    are `unknown` by rule (nothing on the 0-10 scale can be active when the max is not
    positive), as the classify stage documents.
    """
    L = len(rec.vis)
    D = rec.vis[0][0].shape[1]
    category = np.zeros((L, D), dtype=np.int8)
    counts = np.zeros((L, D, 4), dtype=np.int32)
    order = [CATEGORIES.index(c) for c in cfg.tie_break]
    for layer in range(L):
        sample_max = _sample_max(rec, layer)
        for d in range(D):
            mx = sample_max[:, d].max().numpy()  # float32 scalar: the neuron's max over the corpus
            for s in _ranked(sample_max[:, d], cfg.top_n):
                if mx > 0:
                    above = [
                        (np.clip(a[:, d].numpy() / mx * np.float32(10), 0, 10) > t) if cfg.strict
                        else (np.clip(a[:, d].numpy() / mx * np.float32(10), 0, 10) >= t)
                        for a, t in ((rec.vis[layer][s], cfg.visual_threshold), (rec.txt[layer][s], cfg.text_threshold))
                    ]
                    v_on = int(above[0].sum()) >= cfg.visual_min_tokens
                    t_on = int(above[1].sum()) >= cfg.text_min_tokens
                else:
                    v_on = t_on = False
                kind = "multimodal" if v_on and t_on else "visual" if v_on else "text" if t_on else "unknown"
                counts[layer, d, CATEGORIES.index(kind)] += 1
            category[layer, d] = order[int(np.argmax(counts[layer, d][order]))]
    return category, counts


SETTINGS = [
    {},  # the paper's thresholds: Tv=2, nv=4, Tt=3, nt=2, strict
    {"visual_threshold": 1.0, "visual_min_tokens": 2, "text_threshold": 1.5, "text_min_tokens": 1},
    {"visual_threshold": 5.0, "visual_min_tokens": 6, "text_threshold": 6.0, "text_min_tokens": 3, "strict": False},
    # Threshold 0 with >=: a sample is text-activated exactly when it has nt = 9 description
    # tokens (captions have 8 or 9), so the -inf padding of shorter samples decides.
    {"visual_threshold": 0.0, "visual_min_tokens": 1, "text_threshold": 0.0, "text_min_tokens": 9, "strict": False,
     "tie_break": ["unknown", "multimodal", "text", "visual"]},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["paper", "low", "high-nonstrict", "zero-nonstrict"])
def test_categories_from_state_equal_brute_force(recorded: Recorded, settings: dict) -> None:
    cfg = ClassifyConfig(top_n=TOP_N, **settings)
    result = classify_state(recorded.state, cfg)
    category, counts = _brute_categories(recorded, cfg)
    assert np.array_equal(result.counts, counts)
    assert np.array_equal(result.category, category)
    # Not a degenerate check: several categories occur.
    assert len(np.unique(category)) >= 3


# -- the state's own rules, on crafted activations -----------------------------------------


def _fold(state: NeuronState, acts: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, samples: list[int]) -> None:
    state.update_layer(0, acts, BatchPositions.from_masks(visual, text, torch.tensor(samples)))


def _crafted(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """12 samples x 6 positions x 4 neurons with heavy ties (values from a small set, signed
    zeros). Odd samples sit one position later (as with left padding), so a batch mixing
    both gathers its rows and a batch of one reads them in place."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([-1.0, -0.0, 0.0, 0.5, 1.0, 2.0])
    acts = levels[torch.randint(0, len(levels), (12, 6, 4), generator=gen)]
    acts[:, :, 3] = 1.0  # every sample ties on neuron 3
    visual = torch.zeros(12, 6, dtype=torch.bool)
    text = torch.zeros(12, 6, dtype=torch.bool)
    for s in range(12):
        o = s % 2
        visual[s, o : o + 3] = True
        text[s, o + 3 : o + 5] = True
    text[::3, 4:] = False  # some samples have a single description token
    visual[5, :] = False  # one sample without visual positions
    return acts, visual, text


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_top_n_and_merge_follow_the_tie_rule_whatever_the_batching(batch: int) -> None:
    acts, visual, text = _crafted(seed=batch)
    n, m = 4, 3
    order = list(range(12))
    random.Random(batch).shuffle(order)  # samples arrive in any order
    whole = NeuronState.empty(1, 4, n, m)
    halves = [NeuronState.empty(1, 4, n, m), NeuronState.empty(1, 4, n, m)]
    for k, start in enumerate(range(0, 12, batch)):
        idx = order[start : start + batch]
        _fold(whole, acts[idx], visual[idx], text[idx], idx)
        _fold(halves[k % 2], acts[idx], visual[idx], text[idx], idx)
    whole = whole.canonical()
    for d in range(4):
        sample_max = torch.stack([torch.cat([acts[s, visual[s], d], acts[s, text[s], d]]).max() for s in range(12)])
        ranked = _ranked(sample_max, n)
        assert whole.top_sample[0, d].tolist() == ranked
        for slot, s in enumerate(ranked):
            assert torch.equal(whole.top_visual[0, d, slot], _top_m(acts[s, visual[s], d], m))
            assert torch.equal(whole.top_text[0, d, slot], _top_m(acts[s, text[s], d], m))
    assert whole.top_sample[0, 3].tolist() == [0, 1, 2, 3]  # all tied: lowest indices
    merged = halves[0].merge(halves[1])
    for name, tensor in whole.tensors().items():
        if tensor.dtype == torch.float64:
            torch.testing.assert_close(merged.tensors()[name], tensor, rtol=1e-15, atol=1e-15)
        else:
            assert torch.equal(merged.tensors()[name], tensor), name
    assert torch.equal(halves[1].merge(halves[0]).top_sample, merged.top_sample)


def test_canonical_is_an_order_not_a_change() -> None:
    acts, visual, text = _crafted(seed=0)
    state = NeuronState.empty(1, 4, 6, 2)
    for start in range(0, 12, 5):
        idx = list(range(start, min(start + 5, 12)))
        _fold(state, acts[idx], visual[idx], text[idx], idx)
    canon = state.canonical()
    assert torch.equal(canon.canonical().top_sample, canon.top_sample)
    for d in range(4):  # the same (sample, order statistics) pairs, reordered
        before = {int(s): state.top_visual[0, d, i].tolist() for i, s in enumerate(state.top_sample[0, d])}
        after = {int(s): canon.top_visual[0, d, i].tolist() for i, s in enumerate(canon.top_sample[0, d])}
        assert before == after
        assert canon.top_value[0, d].tolist() == sorted(canon.top_value[0, d].tolist(), reverse=True)


def test_batch_positions_rows() -> None:
    visual = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    text = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    pos = BatchPositions.from_masks(visual, text, torch.tensor([4, 9]))
    assert pos.visual.start is None  # sample 0's image starts later: rows are gathered
    assert pos.visual.index.tolist() == [[1, 2, 0], [0, 1, 2]]
    assert pos.visual.pad is not None and pos.visual.pad[..., 0].tolist() == [[False, False, True], [False] * 3]
    assert pos.text.start == 3 and pos.text.index.tolist() == [[3, 4], [3, 0]]  # one shared slice, padded
    assert pos.counts.tolist() == [5, 3]
    assert torch.equal(pos.weights[:, 0].bool(), visual) and torch.equal(pos.weights[:, 1].bool(), text)
    a = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    inf = float("-inf")
    work = torch.empty_like(a)
    assert pos.visual.take(a, work)[:, :, 0].tolist() == [[2.0, 4.0, inf], [10.0, 12.0, 14.0]]
    assert pos.text.take(a, work)[:, :, 1].tolist() == [[7.0, 9.0], [17.0, inf]]
    full = BatchPositions.from_masks(visual[1:], text[:1], torch.tensor([0]))
    assert (full.visual.start, full.visual.pad, full.text.start, full.text.pad) == (0, None, 3, None)
    assert full.visual.take(a[1:], work).data_ptr() == a[1:].data_ptr()  # read in place
    with pytest.raises(ValueError, match="sample index"):
        BatchPositions.from_masks(visual, text, torch.tensor([0, 2**33]))


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
"""Tensor methods that read a value back to the host (on a GPU: a synchronisation)."""


def test_folding_a_layer_in_never_reads_values_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The capture hook runs once per layer per batch: it must queue work on the device and
    never wait for it. Every host read during `update_layer` is caught here (a CPU stand-in
    for CUDA's sync debug mode)."""
    gen = torch.Generator().manual_seed(0)
    visual = torch.zeros(3, 12, dtype=torch.bool)
    visual[:, 1:6] = True
    text = torch.zeros(3, 12, dtype=torch.bool)
    text[:, 7:11] = True
    text[2, 10] = False  # a shorter description
    positions = BatchPositions.from_masks(visual, text, torch.tensor([4, 9, 2]), WorkBuffer())
    state = NeuronState.empty(2, 16, 5, 3, "cpu")
    reads: list[str] = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _name=name, _real=real, **k: (reads.append(_name), _real(self, *a, **k))[1])
    for layer in range(2):
        for _ in range(2):  # the second batch also exercises the merge into a non-empty top-N
            state.update_layer(layer, torch.randn(3, 12, 16, generator=gen), positions)
    monkeypatch.undo()
    assert reads == []
    assert int(state.visual_count[0]) == 2 * 15  # and the work was done
