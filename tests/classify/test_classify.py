"""METHOD.md section 4 on hand-built states: every threshold parameter, the edge cases."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from builder.classify import CATEGORIES, classify_state, layer_table, neuron_table
from builder.config import ClassifyConfig

# A neuron whose max is 10, so activations are already on the 0-10 scale.
PEAK = [10.0]


def categories(state, **settings) -> list[str]:
    result = classify_state(state, ClassifyConfig(**settings))
    return [CATEGORIES[c] for c in result.category.reshape(-1)]


def sample_types(state, **settings) -> list[str]:
    result = classify_state(state, ClassifyConfig(**settings))
    return [CATEGORIES[t] if t >= 0 else "empty" for t in result.sample_type.reshape(-1)]


# -- each threshold parameter ------------------------------------------------------------


def test_visual_threshold_moves_the_visual_decision(make_state) -> None:
    # Visual tokens at 10, 3, 3, 3 (4th largest = 3); no text activation.
    state = make_state([[([10, 3, 3, 3, 1], [0, 0])]])
    assert categories(state, visual_threshold=2.0) == ["visual"]
    assert categories(state, visual_threshold=2.9) == ["visual"]
    assert categories(state, visual_threshold=3.1) == ["unknown"]


def test_visual_min_tokens_moves_the_visual_decision(make_state) -> None:
    state = make_state([[([10, 3, 3, 3, 3, 1, 1], [0])]])
    assert categories(state, visual_min_tokens=5) == ["visual"]  # 5th largest = 3 > 2
    assert categories(state, visual_min_tokens=6) == ["unknown"]  # 6th largest = 1
    assert categories(state, visual_min_tokens=1, visual_threshold=9.5) == ["visual"]


def test_text_threshold_moves_the_text_decision(make_state) -> None:
    # Text tokens at 10 and 4: the 2nd largest is 4.
    state = make_state([[([0, 0, 0, 0], [10, 4, 1])]])
    assert categories(state, text_threshold=3.0) == ["text"]
    assert categories(state, text_threshold=3.9) == ["text"]
    assert categories(state, text_threshold=4.1) == ["unknown"]


def test_text_min_tokens_moves_the_text_decision(make_state) -> None:
    state = make_state([[([0], [10, 4, 4, 1])]])
    assert categories(state, text_min_tokens=3) == ["text"]
    assert categories(state, text_min_tokens=4) == ["unknown"]


def test_both_modalities_make_a_multimodal_sample(make_state) -> None:
    state = make_state([[([10, 5, 5, 5], [6, 6])]])
    assert categories(state) == ["multimodal"]
    assert categories(state, text_threshold=7.0) == ["visual"]
    assert categories(state, visual_threshold=7.0) == ["text"]
    assert categories(state, visual_threshold=7.0, text_threshold=7.0) == ["unknown"]


def test_thresholds_apply_to_normalised_values(make_state) -> None:
    # Max 200 (in another sample): 60 normalises to 3; the scale of a neuron does not matter.
    samples = [([200, 0, 0, 0], [0]), ([60, 60, 60, 60], [0])]
    state = make_state([samples, [([v * 0.001 for v in vis], txt) for vis, txt in samples]])
    assert sample_types(state, visual_threshold=2.9) == ["unknown", "visual"] * 2
    assert sample_types(state, visual_threshold=3.0) == ["unknown", "unknown"] * 2


def test_negative_activations_count_as_zero(make_state) -> None:
    state = make_state([[([10, -5, -5, -5], [-3, -3])]])
    assert categories(state, visual_threshold=0.0, text_threshold=0.0) == ["unknown"]
    assert categories(state, visual_threshold=0.0, text_threshold=0.0, strict=False) == ["multimodal"]


# -- strict vs non-strict at equality ---------------------------------------------------


@pytest.mark.parametrize(("strict", "expected"), [(True, "unknown"), (False, "multimodal")])
def test_strict_comparison_at_equality(make_state, strict: bool, expected: str) -> None:
    # The 4th visual and 2nd text values sit exactly on Tv = 2 and Tt = 3.
    state = make_state([[([10, 2, 2, 2], [3, 3])]])
    assert categories(state, strict=strict) == [expected]


def test_missing_tokens_never_pass_even_at_threshold_zero(make_state) -> None:
    # Three visual tokens and one text token: fewer than nv = 4 and nt = 2 exist.
    state = make_state([[([10, 10, 10], [10])]])
    assert categories(state, visual_threshold=0.0, text_threshold=0.0, strict=False) == ["unknown"]


# -- fractions, argmax, confidence -------------------------------------------------------

VIS = ([10, 5, 5, 5], [0, 0])
TXT = ([0, 0, 0, 0], [10, 5])
MM = ([10, 5, 5, 5], [10, 5])
UNK = ([10, 0, 0, 0], [0, 0])


def test_fractions_category_and_confidence(make_state) -> None:
    state = make_state([[VIS, VIS, VIS, TXT, MM], [UNK, UNK, VIS, TXT, MM]])
    result = classify_state(state, ClassifyConfig())
    np.testing.assert_allclose(result.fractions[0, 0], [0.6, 0.2, 0.2, 0.0])
    np.testing.assert_allclose(result.fractions[0, 1], [0.2, 0.2, 0.2, 0.4])
    assert result.counts[0, 0].tolist() == [3, 1, 1, 0]
    assert [CATEGORIES[c] for c in result.category[0]] == ["visual", "unknown"]
    np.testing.assert_allclose(result.confidence[0], [0.6, 0.4])
    np.testing.assert_allclose(result.fractions.sum(-1), 1.0, rtol=1e-6)


def test_high_confidence_is_strictly_above_the_threshold(make_state) -> None:
    state = make_state([[VIS, VIS, VIS, VIS, TXT]])  # confidence exactly 0.8
    assert not classify_state(state, ClassifyConfig(confidence=0.8)).high_confidence[0, 0]
    assert classify_state(state, ClassifyConfig(confidence=0.79)).high_confidence[0, 0]


@pytest.mark.parametrize(
    "tie_break",
    [
        ["visual", "text", "multimodal", "unknown"],
        ["text", "visual", "multimodal", "unknown"],
        ["multimodal", "unknown", "text", "visual"],
        ["unknown", "multimodal", "visual", "text"],
    ],
)
def test_ties_follow_the_tie_break_order(make_state, tie_break: list[str]) -> None:
    state = make_state([
        [VIS, VIS, TXT, TXT],  # visual = text
        [VIS, TXT, MM, UNK],  # all four equal
        [MM, MM, UNK, UNK, VIS],  # multimodal = unknown > visual
    ])
    got = categories(state, tie_break=tie_break)
    first = lambda among: next(c for c in tie_break if c in among)  # noqa: E731
    assert got == [first({"visual", "text"}), tie_break[0], first({"multimodal", "unknown"})]
    np.testing.assert_allclose(classify_state(state, ClassifyConfig(tie_break=tie_break)).confidence[0],
                               [0.5, 0.25, 0.4])


# -- dead neurons and short corpora ------------------------------------------------------


@pytest.mark.parametrize("settings", [{}, {"visual_threshold": 0.0, "text_threshold": 0.0, "strict": False}])
def test_dead_neurons_are_unknown_and_flagged(make_state, settings: dict) -> None:
    negative = [([-1, -2, -3, -4], [-1, -2])] * 3
    zero = [([0, 0, 0, 0], [0, 0])] * 3
    state = make_state([negative, zero, [VIS, VIS, VIS]])
    result = classify_state(state, ClassifyConfig(**settings))
    # A live neuron with the same tokens would pass under threshold 0 with >=; a dead one not.
    assert [CATEGORIES[c] for c in result.category[0, :2]] == ["unknown", "unknown"]
    assert result.dead[0].tolist() == [True, True, False]
    np.testing.assert_allclose(result.fractions[0, :2], [[0, 0, 0, 1]] * 2)
    assert result.confidence[0, :2].tolist() == [1.0, 1.0]


def test_fewer_samples_than_n(make_state) -> None:
    # N = 6 requested, the corpus had 3 samples.
    state = make_state([[VIS, VIS, TXT]], top_n=6)
    result = classify_state(state, ClassifyConfig(top_n=6))
    assert result.n_top[0, 0] == 3
    np.testing.assert_allclose(result.fractions[0, 0], [2 / 3, 1 / 3, 0, 0], rtol=1e-6)
    assert sample_types(state) == ["visual", "visual", "text", "empty", "empty", "empty"]
    table = neuron_table(state, result, ["s0", "s1", "s2"])
    assert table.column("top_sample_ids").to_pylist() == [["s0", "s1", "s2"]]
    assert table.column("n_top").to_pylist() == [3]


def test_no_samples_at_all(make_state) -> None:
    state = make_state([[]], top_n=4)
    result = classify_state(state, ClassifyConfig(top_n=4))
    assert result.n_top[0, 0] == 0 and result.dead[0, 0]
    assert CATEGORIES[result.category[0, 0]] == "unknown"


def test_too_few_order_statistics_is_refused(make_state) -> None:
    state = make_state([[VIS]], top_m=3)
    with pytest.raises(ValueError, match="capture.top_m"):
        classify_state(state, ClassifyConfig())


# -- tables ------------------------------------------------------------------------------


def test_neuron_and_layer_tables(make_state) -> None:
    state = make_state([[VIS, VIS, TXT], [TXT, TXT, TXT], [MM, MM, VIS], [([-1, -1, -1, -1], [-1, -1])] * 3])
    state.visual_count[:] = 10
    state.text_count[:] = 4
    state.visual_sum[0] = torch_tensor([5.0, 0.0, 10.0, -10.0])
    result = classify_state(state, ClassifyConfig())
    table = neuron_table(state, result, ["a", "b", "c"])
    rows = table.to_pylist()
    assert [r["category"] for r in rows] == ["visual", "text", "multimodal", "unknown"]
    assert [r["neuron"] for r in rows] == [0, 1, 2, 3] and {r["layer"] for r in rows} == {0}
    assert [r["dead"] for r in rows] == [False, False, False, True]
    assert rows[0]["mean_visual"] == pytest.approx(0.5)
    assert rows[3]["max_activation"] == -1.0
    assert rows[2]["high_confidence"] is False and rows[1]["high_confidence"] is True
    assert rows[0]["top_sample_ids"] == ["a", "b", "c"]
    layers = layer_table(table).to_pylist()
    assert layers == [{
        "layer": 0, "neurons": 4,
        "n_visual": 1, "frac_visual": 0.25, "n_high_confidence_visual": 0,
        "n_text": 1, "frac_text": 0.25, "n_high_confidence_text": 1,
        "n_multimodal": 1, "frac_multimodal": 0.25, "n_high_confidence_multimodal": 0,
        "n_unknown": 1, "frac_unknown": 0.25, "n_high_confidence_unknown": 1,
        "n_high_confidence": 2,
    }]
    assert isinstance(table.column("top_sample_ids").type, pa.ListType)


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)
