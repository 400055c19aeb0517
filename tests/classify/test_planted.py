"""Planted recovery: the tiny build on `builtin:planted-llava` finds the neurons planted in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from builder.config import load_recipe
from builder.errors import ModelError
from builder.models.builtin import TinyLlavaSpec, materialize_builtin
from builder.models.planted import CONCEPT_WORDS, PER_LAYER, load_planted, plant_plan
from builder.pipeline import default_stages
from builder.run import Executor


@pytest.fixture(scope="module")
def planted_run(builder_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe (which uses builtin:planted-llava) up to classify, with the significance test."""
    recipe = load_recipe("tiny", ["classify.significance=true", "classify.permutations=500"])
    assert recipe.model.id == "builtin:planted-llava"
    out = tmp_path_factory.mktemp("planted-run")
    Executor(recipe, out, default_stages()).run(until="classify")
    return out


@pytest.fixture(scope="module")
def truth(builder_cache: Path):
    return load_planted(materialize_builtin("planted-llava"))


def test_ground_truth_is_stored_with_the_model(truth) -> None:
    spec = TinyLlavaSpec()
    assert len(truth) == spec.text_layers * (sum(PER_LAYER.values()) + len(CONCEPT_WORDS))
    assert truth == plant_plan(spec)
    per_layer = {(p.layer, p.neuron) for p in truth}
    assert len(per_layer) == len(truth)  # distinct neurons
    assert {p.concept for p in truth if p.concept} == set(CONCEPT_WORDS)
    assert all(p.category == "unknown" for p in truth if p.dead)


def test_planted_categories_are_recovered(planted_run: Path, truth) -> None:
    table = pq.read_table(planted_run / "neurons.parquet").to_pandas().set_index(["layer", "neuron"])
    rows = table.loc[[(p.layer, p.neuron) for p in truth]]
    predicted = [
        "dead" if (c == "unknown" and dead) else c for c, dead in zip(rows["category"], rows["dead"])
    ]
    expected = ["dead" if p.dead else p.category for p in truth]
    for cls in ("visual", "text", "multimodal", "dead"):
        tp = sum(p == cls and e == cls for p, e in zip(predicted, expected))
        n_pred, n_true = predicted.count(cls), expected.count(cls)
        assert n_true >= 12, cls
        assert tp / max(n_pred, 1) >= 0.95, f"{cls}: precision {tp}/{n_pred}"
        assert tp / n_true >= 0.95, f"{cls}: recall {tp}/{n_true}"
    # Every live planted neuron is classified with full confidence.
    assert (rows["confidence"] == 1.0).all()
    # The random neurons around them are not dead.
    assert int(table["dead"].sum()) == sum(p.dead for p in truth)


def test_concept_neurons_top_samples_are_the_captions_with_the_word(planted_run: Path, truth) -> None:
    captions = dict(zip(*pq.read_table(planted_run / "samples.parquet", columns=["sample_id", "caption"])
                        .to_pydict().values()))
    table = pq.read_table(planted_run / "neurons.parquet").to_pandas().set_index(["layer", "neuron"])
    top_n = load_recipe("tiny").classify.top_n
    for p in (p for p in truth if p.concept):
        with_word = {sid for sid, cap in captions.items() if p.concept in cap.split()}
        top = list(table.loc[(p.layer, p.neuron), "top_sample_ids"])
        assert len(with_word) >= top_n, "the corpus must hold N captions with the word for this check"
        assert len(top) == top_n and set(top) <= with_word, (p, top)
        assert table.loc[(p.layer, p.neuron), "category"] == "text"


def test_significance_columns_on_planted_neurons(planted_run: Path, truth) -> None:
    table = pq.read_table(planted_run / "neurons.parquet").to_pandas().set_index(["layer", "neuron"])
    floor = 1 / 501
    for p in truth:
        row = table.loc[(p.layer, p.neuron)]
        if p.dead:
            assert row["p_value_visual_vs_text"] == 1.0 and row["visual_minus_text"] == 0.0
        elif p.category == "visual":
            assert row["p_value_visual_vs_text"] == pytest.approx(floor) and row["visual_minus_text"] > 5
        elif p.category == "text" and not p.concept:
            assert row["p_value_visual_vs_text"] == pytest.approx(floor) and row["visual_minus_text"] < -5
        # All 20 top samples share the winning type.
        assert row["p_value_category"] == pytest.approx(2.0**-20)
    assert np.isfinite(table["p_value_visual_vs_text"]).all()


def test_load_planted_refuses_a_folder_without_ground_truth(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ModelError, match="planted"):
        load_planted(tmp_path)
