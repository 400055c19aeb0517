"""The simulate stage on the planted model: exemplar pass, hand-written explanations, scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.io import write_parquet
from builder.simulate.stage import SCORES_SCHEMA, SimulateStage


@pytest.fixture(scope="module")
def planted_exemplars(builder_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny recipe (planted model) through classify, then the exemplar pass."""
    from builder.config import load_recipe
    from builder.exemplars import ExemplarsStage
    from builder.models.loading import model_folder
    from builder.models.planted import load_planted
    from builder.pipeline import default_stages
    from builder.run import Executor

    recipe = load_recipe("tiny", ["model.id=builtin:planted-llava"])
    ex = Executor(recipe, tmp_path_factory.mktemp("planted"), default_stages())
    ex.run(until="classify")
    ExemplarsStage().run(ex.ctx)
    return ex, load_planted(model_folder(recipe.model))


def _explain_by_hand(ex, planted) -> dict[tuple[int, int], str]:
    """Explanations for every exemplar neuron: the concept neurons named by their word."""
    concept = {(p.layer, p.neuron): p.concept for p in planted if p.concept}
    neurons = {(r["layer"], r["neuron"]): r["category"] for r in pq.read_table(ex.run_dir.neurons).to_pylist()}
    keys = sorted({(r["layer"], r["neuron"]) for r in pq.read_table(ex.run_dir.path("exemplars.parquet"),
                                                                    columns=["layer", "neuron"]).to_pylist()})
    text = {k: f"the word '{concept[k]}'" if k in concept else "shapes" for k in keys}
    rows = [{"layer": k[0], "neuron": k[1], "category": neurons[k], "explanation": text[k], "explainer": "hand",
             "prompt_version": "test", "status": "ok", "failure": None} for k in keys]
    rows.append({"layer": 0, "neuron": 95, "category": "text", "explanation": None, "explainer": "hand",
                 "prompt_version": "test", "status": "failed", "failure": "refusal: no"})
    write_parquet(ex.run_dir.path("explanations.parquet"), pa.Table.from_pylist(rows))
    return text


def test_plan_records_random_samples_outside_the_top_n(planted_exemplars):
    ex, planted = planted_exemplars
    _explain_by_hand(ex, planted)
    tasks = {t.neuron.key: t for t in SimulateStage().plan(ex.ctx)}
    assert (0, 95) not in tasks  # failed explanations are not scored
    red = next(p for p in planted if p.concept == "red" and (p.layer, p.neuron) in tasks)
    task = tasks[(red.layer, red.neuron)]
    top = set(next(r["top_sample_ids"] for r in pq.read_table(ex.run_dir.neurons).to_pylist()
                   if (r["layer"], r["neuron"]) == (red.layer, red.neuron)))
    held = [s for s in task.samples if s.role == "held_out"]
    rand = [s for s in task.samples if s.role == "random"]
    assert len(held) == ex.ctx.recipe.exemplars.held_out and len(rand) == ex.ctx.recipe.simulate.random_samples
    assert {s.sample_id for s in held} <= top and not ({s.sample_id for s in rand} & top)
    texts = {r["sample_id"]: r["text"] for r in pq.read_table(ex.run_dir.texts).to_pylist()}
    for s in task.samples:
        assert "".join(s.tokens).strip() == texts[s.sample_id].strip()
        assert s.heatmap.shape == (6, 6) and s.heatmap.max() == 0  # a text neuron: silent on images
        on_red = np.array([t.strip() == "red" for t in s.tokens])
        if on_red.any():
            assert s.token_activations[on_red].min() > 9
        assert s.token_activations[~on_red].max() < 6
    assert task.baseline is not None and task.baseline.category == "text" and task.baseline.key != task.neuron.key


def test_stage_scores_concept_neurons_against_chance(planted_exemplars, tmp_path):
    ex, planted = planted_exemplars
    _explain_by_hand(ex, planted)
    counts = SimulateStage().run(ex.ctx)
    table = pq.read_table(ex.run_dir.path("scores.parquet"))
    assert table.schema.equals(SCORES_SCHEMA)
    rows = {(r["layer"], r["neuron"]): r for r in table.to_pylist()}
    assert counts["neurons"] == len(rows) == counts["scored"] + counts["undefined"] + counts["failed"]
    concept = [(p.layer, p.neuron) for p in planted if p.concept and (p.layer, p.neuron) in rows]
    assert len(concept) >= 4
    for k in concept:
        r = rows[k]
        assert r["status"] == "ok" and r["simulator"] == "text:offline-token-match-baseline"
        assert r["score"] >= 0.8 and r["text_score"] == r["score"] and r["visual_score"] is None
        assert r["baseline_score"] <= 0.2 and (r["baseline_layer"], r["baseline_neuron"]) != k
        assert len(r["per_sample_scores"]) == r["n_held_out"] + r["n_random"] == 10
        assert {p["role"] for p in r["per_sample_scores"]} == {"held_out", "random"}
    multimodal = [r for r in rows.values() if r["category"] == "multimodal"]
    assert multimodal and all(r["simulator"].startswith("visual:offline-embedding-baseline + text:") for r in multimodal)
    assert all({p["modality"] for p in r["per_sample_scores"]} == {"visual", "text"} for r in multimodal)
    # a rerun resumes from the per-neuron checkpoint: same scores, nothing recomputed
    before = table
    checkpoint = ex.run_dir.path("simulate", "scored.jsonl")
    lines = checkpoint.read_text().count("\n")
    SimulateStage().run(ex.ctx)
    assert checkpoint.read_text().count("\n") == lines
    assert pq.read_table(ex.run_dir.path("scores.parquet")).equals(before)
