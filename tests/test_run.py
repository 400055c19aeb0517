"""The manifest, the skip/redo rules and atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import pytest

from builder.config import load_recipe
from builder.errors import StageError
from builder.io import write_json, write_text
from builder.run import Executor, Manifest, RunContext


class CountingStage:
    """A stage writing one file from its recipe section and its upstream file."""

    version: ClassVar[str] = "1"

    def __init__(self, name: str, section: str, upstream: str | None = None):
        self.name = name
        self.sections = (section,)
        self.upstream = upstream
        self.runs = 0

    def source_fingerprint(self, ctx: RunContext) -> str:
        return ""

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.path(f"{self.name}.txt")]

    def run(self, ctx: RunContext) -> dict[str, int]:
        self.runs += 1
        before = ctx.run_dir.path(f"{self.upstream}.txt").read_text() if self.upstream else ""
        write_text(self.outputs(ctx)[0], before + json.dumps(ctx.recipe.section_dict(self.sections[0])))
        return {"runs": self.runs}


def chain() -> list[CountingStage]:
    return [CountingStage("a", "corpus"), CountingStage("b", "classify", "a"), CountingStage("c", "package", "b")]


def runs(stages: list[CountingStage]) -> list[int]:
    return [s.runs for s in stages]


def test_unchanged_inputs_skip_every_stage(tmp_path: Path) -> None:
    stages = chain()
    Executor(load_recipe("tiny"), tmp_path, stages).run()
    Executor(load_recipe("tiny"), tmp_path, stages).run()
    assert runs(stages) == [1, 1, 1]
    manifest = Manifest.load(tmp_path / "manifest.json")
    assert [manifest.stages[n].status for n in "abc"] == ["done"] * 3
    assert manifest.stages["a"].counts == {"runs": 1}
    assert manifest.recipe["recipe"]["name"] == "tiny"
    assert manifest.package["version"]


def test_changed_section_redoes_that_stage_and_after(tmp_path: Path) -> None:
    stages = chain()
    Executor(load_recipe("tiny"), tmp_path, stages).run()
    Executor(load_recipe("tiny", ["classify.top_n=3"]), tmp_path, stages).run()
    assert runs(stages) == [1, 2, 2]
    Executor(load_recipe("tiny", ["classify.top_n=3", "package.version=9.9.9"]), tmp_path, stages).run()
    assert runs(stages) == [1, 2, 3]


def test_force_redoes_stage_and_followers(tmp_path: Path) -> None:
    stages = chain()
    Executor(load_recipe("tiny"), tmp_path, stages).run()
    Executor(load_recipe("tiny"), tmp_path, stages).run(force=["b"])
    assert runs(stages) == [1, 2, 2]
    with pytest.raises(StageError, match="unknown stage"):
        Executor(load_recipe("tiny"), tmp_path, stages).run(force=["zzz"])


def test_until_stops_and_missing_output_reruns(tmp_path: Path) -> None:
    stages = chain()
    Executor(load_recipe("tiny"), tmp_path, stages).run(until="a")
    assert runs(stages) == [1, 0, 0]
    Executor(load_recipe("tiny"), tmp_path, stages).run()
    assert runs(stages) == [1, 1, 1]
    (tmp_path / "b.txt").unlink()
    Executor(load_recipe("tiny"), tmp_path, stages).run()
    assert runs(stages) == [1, 2, 1], "b reruns; c's inputs are byte-identical so c is skipped"


def test_failed_stage_is_recorded_and_rerun(tmp_path: Path) -> None:
    stages = chain()

    def boom(ctx: RunContext) -> dict[str, int]:
        raise RuntimeError("disk on fire")

    original = stages[1].run
    stages[1].run = boom  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        Executor(load_recipe("tiny"), tmp_path, stages).run()
    manifest = Manifest.load(tmp_path / "manifest.json")
    assert manifest.stages["b"].status == "failed"
    assert "disk on fire" in manifest.stages["b"].error
    stages[1].run = original  # type: ignore[method-assign]
    Executor(load_recipe("tiny"), tmp_path, stages).run()
    assert runs(stages) == [1, 1, 1]


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    from builder.io import atomic_path

    target = tmp_path / "x.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"], "no temp file left behind"


@pytest.mark.slow
def test_tiny_build_second_run_skips_everything(tiny_run: Path, tmp_path: Path) -> None:
    from builder.pipeline import default_stages

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")}
    outcomes = Executor(load_recipe("tiny"), run, default_stages()).run()
    assert not any(o.ran for o in outcomes)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")} == before
    # A classification threshold changes classify and what follows, never capture.
    outcomes = Executor(load_recipe("tiny", ["classify.text_threshold=4.5"]), run, default_stages()).run()
    ran = {o.name for o in outcomes if o.ran}
    assert "capture" not in ran and "corpus" not in ran
    assert {"classify", "package", "validate"} <= ran
    manifest = Manifest.load(run / "manifest.json")
    assert manifest.model["id"] == "builtin:tiny-llava" or manifest.model["id"].startswith("builtin:")
    assert manifest.corpus["fingerprint"]
    for name, record in manifest.stages.items():
        assert record.status == "done", name
        assert record.seconds >= 0
