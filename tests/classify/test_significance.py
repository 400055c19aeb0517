"""The significance test on synthetic states whose answer is known."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import torch

from builder.capture.state import NeuronState
from builder.classify import (
    CATEGORIES,
    SIGNIFICANCE_COLUMNS,
    binomial_upper_tail,
    classify_state,
    neuron_table,
    significance_features,
    significance_test,
)
from builder.config import ClassifyConfig


def levels_state(visual: np.ndarray, text: np.ndarray) -> NeuronState:
    """One layer, neuron d's top sample i with visual level visual[d, i] and text level text[d, i].

    Every order statistic of a modality equals its level and the neuron max is 10, so the
    nv-th visual and nt-th text values normalise to exactly these levels. NaN marks an empty slot.
    """
    D, N = visual.shape
    m = 8
    state = NeuronState.empty(1, D, N, m)
    valid = ~np.isnan(visual)
    state.top_visual[0] = torch.from_numpy(np.nan_to_num(visual, nan=-np.inf)).float()[..., None].expand(D, N, m)
    state.top_text[0] = torch.from_numpy(np.nan_to_num(text, nan=-np.inf)).float()[..., None].expand(D, N, m)
    state.top_sample[0] = torch.where(torch.from_numpy(valid), torch.arange(N).expand(D, N), -1)
    state.max_all[0] = 10.0
    return state


def run(state: NeuronState, seed: int = 0, permutations: int = 1000, **settings):
    cfg = ClassifyConfig(permutations=permutations, seed=seed, significance=True, **settings)
    result = classify_state(state, cfg)
    return result, significance_test(state, cfg, result, np.random.default_rng(seed))


def test_clearly_different_modalities_are_significant() -> None:
    rng = np.random.default_rng(1)
    strong, weak = rng.uniform(6, 9, (40, 30)), rng.uniform(0, 3, (40, 30))
    _, visual_pref = run(levels_state(strong, weak))
    _, text_pref = run(levels_state(weak, strong))
    floor = 1 / 1001  # the smallest p-value 1000 sampled permutations can give
    assert np.all(visual_pref.p_value_visual_vs_text == pytest.approx(floor))
    assert np.all(text_pref.p_value_visual_vs_text == pytest.approx(floor))
    assert np.all(visual_pref.visual_minus_text > 3) and np.all(text_pref.visual_minus_text < -3)
    assert not visual_pref.exact and visual_pref.permutations == 1000


def test_multimodal_by_thresholds_but_visual_by_the_test() -> None:
    # The critique's case: visual at ~9, text at ~4: both cross Tv = 2 and Tt = 3.
    rng = np.random.default_rng(2)
    state = levels_state(rng.uniform(8.5, 9.5, (5, 20)), rng.uniform(3.5, 4.5, (5, 20)))
    result, sig = run(state)
    assert [CATEGORIES[c] for c in result.category[0]] == ["multimodal"] * 5
    assert np.all(sig.p_value_visual_vs_text < 0.01) and np.all(sig.visual_minus_text > 4)


def test_identical_distributions_give_uniform_p_values() -> None:
    # H0 true for every neuron: visual and text levels from the same distribution.
    rng = np.random.default_rng(3)
    visual, text = rng.uniform(0, 10, (2000, 30)), rng.uniform(0, 10, (2000, 30))
    _, sig = run(levels_state(visual, text))
    p = sig.p_value_visual_vs_text[0]
    assert 0.03 <= (p < 0.05).mean() <= 0.07
    assert 0.45 <= (p < 0.5).mean() <= 0.55
    assert abs(float(np.median(sig.visual_minus_text))) < 0.2


def test_same_seed_same_p_values_other_seed_others() -> None:
    rng = np.random.default_rng(4)
    state = levels_state(rng.uniform(0, 10, (200, 25)), rng.uniform(0, 10, (200, 25)))
    _, a = run(state, seed=7)
    _, b = run(state, seed=7)
    _, c = run(state, seed=8)
    np.testing.assert_array_equal(a.p_value_visual_vs_text, b.p_value_visual_vs_text)
    assert not np.array_equal(a.p_value_visual_vs_text, c.p_value_visual_vs_text)
    np.testing.assert_array_equal(a.visual_minus_text, c.visual_minus_text)  # the statistic has no randomness


def test_few_samples_enumerate_every_sign_pattern() -> None:
    # 4 samples: 16 sign patterns <= 1000, so the test is exact and needs no seed.
    visual = np.array([[6, 6, 6, 6], [6, 2, 6, 2], [7, 7, 7, 2], [1, 1, 1, 1]], dtype=float)
    text = np.array([[2, 2, 2, 2], [2, 6, 2, 6], [2, 2, 2, 7], [1, 1, 1, 1]], dtype=float)
    pad = np.full((4, 3), np.nan)  # N = 7 requested, 4 samples each
    state = levels_state(np.hstack([visual, pad]), np.hstack([text, pad]))
    _, a = run(state, seed=0)
    _, b = run(state, seed=99)
    assert a.exact and a.permutations == 16
    np.testing.assert_array_equal(a.p_value_visual_vs_text, b.p_value_visual_vs_text)
    # d = (4,4,4,4): only ++++ and ---- reach |16|. d = (4,-4,4,-4): sum 0, every pattern does.
    # d = (5,5,5,-5): the sum is 5 * (s1 + s2 + s3 - s4), below |10| only when that is 0,
    # which 6 of the 16 patterns give. No difference at all (d = 0): p = 1.
    np.testing.assert_allclose(a.p_value_visual_vs_text[0], [2 / 16, 1.0, 10 / 16, 1.0])
    np.testing.assert_allclose(a.visual_minus_text[0], [4, 0, 2.5, 0])


def test_dead_neurons_have_no_preference() -> None:
    state = levels_state(np.full((2, 12), 5.0), np.full((2, 12), 0.0))
    state.max_all[0, 1] = -1.0  # dead
    state.top_visual[0, 1] = -1.0
    _, sig = run(state)
    assert sig.visual_minus_text[0, 1] == 0 and sig.p_value_visual_vs_text[0, 1] == 1.0
    assert sig.p_value_visual_vs_text[0, 0] < 0.01


def test_category_p_value_is_the_exact_sign_test_against_the_runner_up() -> None:
    # Types by (visual, text) level pairs: visual (9, 0), text (0, 9), multimodal (9, 9), unknown (0, 0).
    kinds = {"visual": (9, 0), "text": (0, 9), "multimodal": (9, 9), "unknown": (0, 0)}

    def neuron(**counts: int) -> list[tuple[int, int]]:
        return [kinds[k] for k, n in counts.items() for _ in range(n)]

    rows = [neuron(visual=10), neuron(visual=6, text=4), neuron(visual=5, multimodal=5),
            neuron(text=7, multimodal=2, unknown=1)]
    visual = np.array([[v for v, _ in r] for r in rows], dtype=float)
    text = np.array([[t for _, t in r] for r in rows], dtype=float)
    result, sig = run(levels_state(visual, text))
    assert [CATEGORIES[c] for c in result.category[0]] == ["visual", "visual", "visual", "text"]

    def tail(n: int, k: int) -> float:
        return sum(comb(n, j) for j in range(k, n + 1)) / 2**n

    expected = [tail(10, 10), tail(10, 6), tail(10, 5), tail(9, 7)]
    np.testing.assert_allclose(sig.p_value_category[0], expected, rtol=1e-6)
    assert sig.p_value_category[0, 2] > 0.5  # a tie is no evidence


def test_binomial_tail_table() -> None:
    tail = binomial_upper_tail(12)
    for n in range(13):
        assert tail[n, 0] == 1.0 and tail[n, n + 1] == 0.0
        for k in range(n + 1):
            assert tail[n, k] == pytest.approx(sum(comb(n, j) for j in range(k, n + 1)) / 2**n)


def test_columns_in_the_neuron_table() -> None:
    rng = np.random.default_rng(5)
    state = levels_state(rng.uniform(0, 10, (3, 6)), rng.uniform(0, 10, (3, 6)))
    result, sig = run(state)
    table = neuron_table(state, result, [f"s{i}" for i in range(6)], sig)
    for name, (dtype, _) in SIGNIFICANCE_COLUMNS.items():
        assert str(table.schema.field(name).type) == {"float32": "float"}[dtype]
        np.testing.assert_array_equal(table.column(name).to_numpy(), getattr(sig, name).reshape(-1))
    assert set(significance_features()) == set(SIGNIFICANCE_COLUMNS)
    # Without the test the columns are still there, all null: the schema never depends on the option.
    plain = neuron_table(state, result, [f"s{i}" for i in range(6)])
    for name in SIGNIFICANCE_COLUMNS:
        assert plain.column(name).null_count == plain.num_rows
