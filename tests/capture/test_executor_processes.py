"""The Executor under several processes, with stand-in stages and two threads as the two
processes (a threading barrier for the process group): who runs what, reruns, --until."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from builder.config import load_recipe
from builder.run import Executor, Processes, RunContext


@dataclass(frozen=True)
class ThreadProcesses(Processes):
    """Processes whose barrier is a threading barrier shared by the 'processes'."""

    gate: threading.Barrier = field(default=None, compare=False)  # type: ignore[assignment]

    def barrier(self) -> None:
        self.gate.wait(timeout=20)


class RecordingStage:
    """Writes `<name>.out` (main process) with the given content; records who ran it."""

    version = "1"
    sections = ()

    def __init__(self, name: str, runs: list[tuple[str, int]], content: str, distributed: bool = False,
                 before: str = "text"):
        self.name = name
        self.before = before
        self.runs = runs
        self.content = content
        self.distributed = distributed

    def source_fingerprint(self, ctx: RunContext) -> str:
        return ""

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.path(f"{self.name}.out")]

    def reset(self, ctx: RunContext) -> None:
        self.runs.append((f"reset {self.name}", ctx.processes.rank))

    def run(self, ctx: RunContext) -> dict[str, int]:
        self.runs.append((self.name, ctx.processes.rank))
        if self.distributed:
            # Every process starts its shard after the main process wrote the stage before's output.
            assert ctx.run_dir.path(f"{self.before}.out").read_text() == self.content
            ctx.processes.barrier()  # as capture does before the main process merges
        if ctx.processes.is_main:
            ctx.run_dir.path(f"{self.name}.out").write_text(self.content)
        return {"rank": ctx.processes.rank}


def _launch(tmp_path: Path, until: str | None = None, force: tuple[str, ...] = (), content: str = "v1",
            distributed_text: bool = False):
    """Run the executor as two 'processes' (threads); the stages each one ran, sorted."""
    runs: list[tuple[str, int]] = []
    gate = threading.Barrier(2)
    errors: list[BaseException] = []

    def process(rank: int) -> None:
        try:
            stages = [RecordingStage("corpus", runs, content),
                      RecordingStage("text", runs, content, distributed=distributed_text, before="corpus"),
                      RecordingStage("capture", runs, content, distributed=True),
                      RecordingStage("classify", runs, content)]
            ex = Executor(load_recipe("tiny"), tmp_path, stages)
            ex.processes = ex.ctx.processes = ThreadProcesses(rank, 2, gate)
            ex.run(force=list(force), until=until)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            gate.abort()

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a process hangs"
    return sorted(runs)


def test_main_runs_serial_stages_and_every_process_its_shard(tmp_path: Path) -> None:
    runs = _launch(tmp_path)
    assert runs == [("capture", 0), ("capture", 1), ("classify", 0), ("corpus", 0), ("text", 0)]
    assert (tmp_path / "classify.out").read_text() == "v1"
    # A rerun finds everything done on both processes (and nobody waits forever).
    assert _launch(tmp_path) == []


def test_until_before_the_shared_stage_leaves_the_others_idle(tmp_path: Path) -> None:
    assert _launch(tmp_path, until="text") == [("corpus", 0), ("text", 0)]
    assert _launch(tmp_path, until="capture") == [("capture", 0), ("capture", 1)]
    assert _launch(tmp_path) == [("classify", 0)]


def test_changed_upstream_resets_and_reruns_the_shared_stage_on_every_process(tmp_path: Path) -> None:
    _launch(tmp_path)
    # text writes something new: capture's inputs changed, so the main process resets it
    # (both wait for that) and every process captures again.
    runs = _launch(tmp_path, force=("text",), content="v2")
    assert runs == [("capture", 0), ("capture", 1), ("classify", 0), ("reset capture", 0), ("reset classify", 0),
                    ("reset text", 0), ("text", 0)]


def test_forced_shared_stage_runs_on_every_process(tmp_path: Path) -> None:
    _launch(tmp_path)
    # --force redoes the stage from scratch: its checkpoints are reset (by the main process) first.
    assert _launch(tmp_path, force=("capture",)) == [("capture", 0), ("capture", 1), ("classify", 0),
                                                     ("reset capture", 0), ("reset classify", 0)]


def test_single_process_needs_no_barrier(tmp_path: Path) -> None:
    runs: list[tuple[str, int]] = []
    stages = [RecordingStage("corpus", runs, "v1"), RecordingStage("text", runs, "v1"),
              RecordingStage("capture", runs, "v1", distributed=True)]
    ex = Executor(load_recipe("tiny"), tmp_path, stages)
    assert ex.processes == Processes(0, 1)
    ex.run()
    assert runs == [("corpus", 0), ("text", 0), ("capture", 0)]


def test_consecutive_shared_stages_each_start_from_the_main_process_outputs(tmp_path: Path) -> None:
    # text and capture both run on every process (generation shares out its images): capture
    # must start only once the main process has written text's output and recorded it.
    runs = _launch(tmp_path, distributed_text=True)
    assert runs == [("capture", 0), ("capture", 1), ("classify", 0), ("corpus", 0), ("text", 0), ("text", 1)]
    assert _launch(tmp_path, distributed_text=True) == []
    runs = _launch(tmp_path, force=("corpus",), content="v2", distributed_text=True)
    assert runs == [("capture", 0), ("capture", 1), ("classify", 0), ("corpus", 0), ("reset capture", 0),
                    ("reset classify", 0), ("reset corpus", 0), ("reset text", 0), ("text", 0), ("text", 1)]
    assert (tmp_path / "classify.out").read_text() == "v2"
