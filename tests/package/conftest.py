"""Fixtures for packaging and validation: copies of the tiny run, plus the tables the
exemplars, explain and simulate stages write (exemplars.parquet, explanations.parquet,
scores.parquet), made here with known contents so every config is exercised whatever
those stages select."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

EXEMPLARS_PER_NEURON = 4
EXPLAINED_NEURONS = 8


def copy_run(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest)
    return dest


def package(run: Path, **package_keys: Any) -> Path:
    """Run the package stage on a run directory with its recorded recipe (package keys overridden)."""
    from builder.config import recipe_from_dict
    from builder.package import PackageStage
    from builder.run import Manifest, RunContext, RunDir

    manifest = Manifest.load(run / "manifest.json")
    data = dict(manifest.recipe)
    data["package"] = {**data["package"], **package_keys}
    PackageStage().run(RunContext(recipe_from_dict(data), RunDir(run), manifest))
    return run / "dataset"


def explained_neurons(run: Path) -> list[dict[str, Any]]:
    """Live neurons of every category with enough top samples, a few per category."""
    rows = pq.read_table(run / "neurons.parquet").to_pylist()
    picked: list[dict[str, Any]] = []
    for category in ("visual", "text", "multimodal", "unknown"):
        mine = [r for r in rows if r["category"] == category and not r["dead"] and r["n_top"] >= EXEMPLARS_PER_NEURON]
        picked += mine[: EXPLAINED_NEURONS // 4]
    return picked


def png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def exemplars_table(run: Path, grid: tuple[int, int] = (6, 6)) -> pa.Table:
    """What the exemplars stage writes: images as PNG bytes, heatmaps as nested lists."""
    texts = {r["sample_id"]: r["text"] for r in pq.read_table(run / "texts.parquet").to_pylist()}
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(explained_neurons(run)):
        for rank in range(EXEMPLARS_PER_NEURON):
            sample = n["top_sample_ids"][rank]
            tokens = texts[sample].split()
            rows.append({
                "layer": n["layer"], "neuron": n["neuron"], "rank": rank, "sample_id": sample,
                "role": "shown" if rank < EXEMPLARS_PER_NEURON // 2 else "held_out",
                "image": png(i * 100 + rank),
                "heatmap": np.round(rng.uniform(0, 10, grid), 3).tolist(),
                "tokens": tokens,
                "token_activations": np.round(rng.uniform(0, 10, len(tokens)), 3).tolist(),
            })
    rows.reverse()  # the package stage, not the source, decides the row order
    return pa.Table.from_pylist(rows)


def explanations_table(run: Path) -> pa.Table:
    """What the explain stage writes: one row per explained neuron, one of them a failure."""
    rows = []
    for i, n in enumerate(explained_neurons(run)):
        failed = i == 1
        rows.append({
            "layer": n["layer"], "neuron": n["neuron"], "category": n["category"],
            "explanation": None if failed else f"{n['category']} things number {i}",
            "explainer": "offline", "prompt_version": "test-1",
            "status": "failed" if failed else "ok",
            "failure": "refusal: the model declined" if failed else None,
        })
    return pa.Table.from_pylist(rows)


def scores_table(run: Path) -> pa.Table:
    """What the simulate stage writes: a score, a chance baseline and per-sample scores for
    every explanation that did not fail."""
    from builder.simulate.stage import SCORES_SCHEMA

    rng = np.random.default_rng(1)
    rows = []
    for i, n in enumerate(explained_neurons(run)):
        if i == 1:  # the failed explanation has no score
            continue
        held = n["top_sample_ids"][EXEMPLARS_PER_NEURON // 2 : EXEMPLARS_PER_NEURON]
        rows.append({
            "layer": n["layer"], "neuron": n["neuron"], "category": n["category"], "simulator": "offline",
            "score": round(float(rng.uniform(-0.2, 0.9)), 4), "visual_score": None,
            "text_score": None, "constant_prediction": False,
            "baseline_score": round(float(rng.uniform(-0.2, 0.2)), 4),
            "per_sample_scores": [
                {"sample_id": s, "modality": "text", "role": "held_out", "score": round(float(rng.uniform(-1, 1)), 4)}
                for s in held
            ],
            "n_held_out": len(held), "n_random": 0, "status": "ok",
        })
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def add_explained(run: Path, scored: bool = True) -> Path:
    """Write the exemplars, explanations (and scores) tables and record them in the manifest as
    those stages would."""
    from builder.run import Manifest, StageRecord

    exemplars, explanations = exemplars_table(run), explanations_table(run)
    pq.write_table(exemplars, run / "exemplars.parquet")
    pq.write_table(explanations, run / "explanations.parquet")
    if scored:
        pq.write_table(scores_table(run), run / "scores.parquet")
    else:
        (run / "scores.parquet").unlink(missing_ok=True)
    manifest = Manifest.load(run / "manifest.json")
    manifest.stages["exemplars"] = StageRecord(status="done", counts={"exemplars": exemplars.num_rows})
    manifest.stages["explain"] = StageRecord(status="done", counts={"neurons": explanations.num_rows})
    manifest.save(run / "manifest.json")
    return run


class Tools:
    """The helpers above, for test modules (importlib mode: test modules cannot import conftest)."""

    copy_run = staticmethod(copy_run)
    package = staticmethod(package)
    explained_neurons = staticmethod(explained_neurons)
    exemplars_table = staticmethod(exemplars_table)
    explanations_table = staticmethod(explanations_table)
    scores_table = staticmethod(scores_table)
    add_explained = staticmethod(add_explained)
    exemplars_per_neuron = EXEMPLARS_PER_NEURON


@pytest.fixture(scope="session")
def tools() -> type[Tools]:
    return Tools


@pytest.fixture(scope="session")
def full_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run with exemplars and explanations, packaged (read-only: copy it)."""
    run = add_explained(copy_run(tiny_run, tmp_path_factory.mktemp("full") / "run"))
    package(run)
    return run


@pytest.fixture
def dataset(full_run: Path, tmp_path: Path) -> Path:
    """A private copy of the full run's dataset folder, free to damage."""
    return Path(shutil.copytree(full_run / "dataset", tmp_path / "dataset"))
