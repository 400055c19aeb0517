"""The run directory, its manifest, the stage interface and the executor that runs stages.

Every stage is a :class:`Stage`: it declares the recipe sections it reads and writes its
files into the run directory. The executor decides whether a stage runs: a stage is
skipped when the manifest says it finished with the same fingerprint, where the
fingerprint covers the stage's code version, its recipe sections and the digests of
everything upstream. Changing an input therefore redoes that stage and all that follow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Protocol

from builder import __version__
from builder.config import Recipe
from builder.errors import StageError
from builder.io import read_jsonl, stable_hash, write_json

log = logging.getLogger("builder")

MANIFEST_SCHEMA = 1


@dataclass
class StageRecord:
    """What the manifest keeps about one stage."""

    status: str = "pending"
    """`pending`, `running`, `done` or `failed`."""
    fingerprint: str = ""
    """Hash of the stage's code version, recipe sections and upstream outputs."""
    output_digest: str = ""
    """Hash of what the stage wrote; part of every downstream fingerprint."""
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    """Stage-specific counts (samples, skipped, neurons, ...)."""
    error: str = ""


@dataclass
class Manifest:
    """`manifest.json`: the resolved recipe, provenance and every stage's status."""

    schema_version: int = MANIFEST_SCHEMA
    recipe: dict[str, Any] = field(default_factory=dict)
    package: dict[str, str] = field(default_factory=dict)
    """`version` and `git_commit` of the builder that made the run."""
    model: dict[str, Any] = field(default_factory=dict)
    """Model id, revision, resolved commit and fingerprint."""
    corpus: dict[str, Any] = field(default_factory=dict)
    """Corpus kind, path and fingerprint (hash of samples.parquet)."""
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        import json

        data = json.loads(path.read_text())
        stages = {k: StageRecord(**v) for k, v in data.pop("stages", {}).items()}
        return cls(**data, stages=stages)

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))


def git_commit() -> str:
    """Commit of the builder's source checkout, or '' when installed from a wheel."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


@dataclass(frozen=True)
class Processes:
    """This process's place in a multi-process launch (`accelerate launch`, torchrun)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Processes:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op in a single process)."""
        if self.world > 1:
            import torch
            from accelerate import PartialState

            # Without CUDA, accelerate only joins the process group (gloo) when told cpu=True.
            PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


class RunDir:
    """Paths of one run directory. Stages write only below it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def samples(self) -> Path:
        return self.root / "samples.parquet"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.jsonl"

    @property
    def texts(self) -> Path:
        return self.root / "texts.parquet"

    @property
    def capture_dir(self) -> Path:
        return self.root / "capture"

    @property
    def neurons(self) -> Path:
        return self.root / "neurons.parquet"

    @property
    def layers(self) -> Path:
        return self.root / "layers.parquet"

    def skipped_rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.skipped)


class RunContext:
    """What a stage gets: the recipe, the run directory and shared, lazily built resources."""

    def __init__(self, recipe: Recipe, run_dir: RunDir, manifest: Manifest, processes: Processes | None = None):
        self.recipe = recipe
        self.run_dir = run_dir
        self.manifest = manifest
        self.processes = processes or Processes()

    def save_manifest(self) -> None:
        if self.processes.is_main:
            self.manifest.save(self.run_dir.manifest_path)

    @cached_property
    def vlm(self) -> Any:
        """The loaded model and processor, shared by every stage that needs them. Its
        provenance (resolved commit, shape) goes into the manifest, which the executor
        saves with the record of the stage that loaded it."""
        from builder.models.loading import load_vlm

        loaded = load_vlm(self.recipe.model)
        self.manifest.model.update(loaded.provenance())
        return loaded


class Stage(Protocol):
    """One step of the pipeline: reads upstream files and recipe sections, writes files."""

    name: ClassVar[str]
    """Stage name, used by `--force`, `--until` and the manifest."""
    version: ClassVar[str]
    """Bumped when the stage's output format or semantics change (invalidates old runs)."""
    sections: ClassVar[tuple[str, ...]]
    """Recipe sections whose values the stage's output depends on."""

    def source_fingerprint(self, ctx: RunContext) -> str:
        """Hash of inputs outside the run directory (corpus files, model weights); '' if none."""
        ...

    def run(self, ctx: RunContext) -> dict[str, int]:
        """Do the work (resuming from any checkpoint) and return counts for the manifest."""
        ...

    def outputs(self, ctx: RunContext) -> list[Path]:
        """Files whose existence and content define the stage's result."""
        ...


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def outputs_digest(paths: list[Path]) -> str:
    from builder.io import file_digest

    parts = []
    for p in paths:
        if p.is_dir():
            parts.extend((str(f.relative_to(p)), file_digest(f)) for f in sorted(p.rglob("*")) if f.is_file())
        elif p.is_file():
            parts.append((p.name, file_digest(p)))
    return stable_hash(parts)


@dataclass
class StageOutcome:
    name: str
    ran: bool
    seconds: float
    counts: dict[str, int]


class Executor:
    """Runs stages in order, skipping those whose fingerprint is unchanged."""

    def __init__(self, recipe: Recipe, out: str | Path, stages: list[Stage]):
        self.recipe = recipe
        self.run_dir = RunDir(out)
        self.stages = stages
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        mp = self.run_dir.manifest_path
        self.manifest = Manifest.load(mp) if mp.exists() else Manifest()
        self.manifest.recipe = recipe.model_dump(mode="json")
        self.manifest.package = {"version": __version__, "git_commit": git_commit()}
        self.processes = Processes.from_env()
        self.ctx = RunContext(recipe, self.run_dir, self.manifest, self.processes)

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def _check_names(self, names: list[str], flag: str) -> None:
        for n in names:
            if n not in self.stage_names():
                raise StageError(f"{flag} {n!r}: unknown stage; stages are {', '.join(self.stage_names())}")

    def run(self, force: list[str] = (), until: str | None = None) -> list[StageOutcome]:
        force = list(force)
        self._check_names(force + ([until] if until else []), "--force/--until")
        forced_from = min((self.stage_names().index(f) for f in force), default=None)
        stages = self.stages[: self.stage_names().index(until) + 1] if until else self.stages
        upstream = stable_hash({"recipe_name": self.recipe.recipe.name})
        outcomes = []
        procs = self.processes
        # Several processes: the main one runs every stage alone except the span from the
        # first to the last `distributed` stage, which every process runs (capture: each its
        # shard). The others wait for the main one at the start of that span and stop after it.
        shared = [i for i, s in enumerate(stages) if getattr(s, "distributed", False)]
        first, last = (shared[0], shared[-1]) if procs.world > 1 and shared else (len(stages), -1)
        if procs.world > 1 and not procs.is_main and not shared:
            return outcomes  # nothing to share out
        for i, stage in enumerate(stages):
            if i == first:
                procs.barrier()  # the main process has run every stage before this one
                if not procs.is_main:
                    self._reload_manifest()
                    for before in stages[:i]:
                        done = self.manifest.stages[before.name]
                        upstream = stable_hash([upstream, done.fingerprint, done.output_digest])
                procs.barrier()  # nobody changes the manifest before every process has read it
            everywhere = first <= i <= last
            if not procs.is_main and not everywhere:
                if i > last:
                    break
                continue
            fingerprint = self._fingerprint(stage, upstream)
            record = self.manifest.stages.get(stage.name, StageRecord())
            forced = forced_from is not None and i >= forced_from
            if self._up_to_date(stage, record, fingerprint) and not forced:
                log.info("stage %-11s up to date, skipped", stage.name)
                outcomes.append(StageOutcome(stage.name, False, 0.0, record.counts))
            else:
                changed = record.fingerprint != fingerprint and record.status in ("done", "running", "failed")
                if changed or (forced and record.status == "done"):
                    # Inputs changed, or a redo was asked for: checkpoints must not be resumed.
                    reset = getattr(stage, "reset", None)
                    if reset is not None and record.fingerprint:
                        if procs.is_main:
                            reset(self.ctx)
                        if everywhere:
                            procs.barrier()
                record = self._run_stage(stage, fingerprint)
                outcomes.append(StageOutcome(stage.name, True, record.seconds, record.counts))
                if everywhere and procs.world > 1:
                    # The main process has written the stage's outputs and recorded them: the
                    # next stage may read them, and every process continues from the same record
                    # (so all agree on what is up to date after it).
                    procs.barrier()
                    if not procs.is_main:
                        self._reload_manifest()
                        record = self.manifest.stages[stage.name]
            upstream = stable_hash([upstream, record.fingerprint, record.output_digest])
        return outcomes

    def _reload_manifest(self) -> None:
        """Take the manifest as the main process saved it (other processes of a launch)."""
        self.manifest = Manifest.load(self.run_dir.manifest_path)
        self.ctx.manifest = self.manifest

    def _fingerprint(self, stage: Stage, upstream: str) -> str:
        return stable_hash(
            {
                "stage": stage.name,
                "version": stage.version,
                "sections": {s: self.recipe.section_dict(s) for s in stage.sections},
                "source": stage.source_fingerprint(self.ctx),
                "upstream": upstream,
            }
        )

    def _up_to_date(self, stage: Stage, record: StageRecord, fingerprint: str) -> bool:
        return (
            record.status == "done"
            and record.fingerprint == fingerprint
            and all(p.exists() for p in stage.outputs(self.ctx))
        )

    def up_to_date(self) -> dict[str, bool]:
        """Which stages a run would skip, computed without running anything.

        A stage counts as up to date only when every stage before it is too.
        """
        upstream = stable_hash({"recipe_name": self.recipe.recipe.name})
        status: dict[str, bool] = {}
        chain_ok = True
        for stage in self.stages:
            record = self.manifest.stages.get(stage.name, StageRecord())
            chain_ok = chain_ok and self._up_to_date(stage, record, self._fingerprint(stage, upstream))
            status[stage.name] = chain_ok
            upstream = stable_hash([upstream, record.fingerprint, record.output_digest])
        return status

    def _run_stage(self, stage: Stage, fingerprint: str) -> StageRecord:
        record = StageRecord(status="running", fingerprint=fingerprint, started_at=_now())
        self.manifest.stages[stage.name] = record
        self.ctx.save_manifest()
        log.info("stage %-11s running", stage.name)
        t0 = time.perf_counter()
        try:
            counts = stage.run(self.ctx)
        except BaseException as e:
            record.status = "failed"
            record.error = f"{type(e).__name__}: {e}"[:500]
            record.seconds = round(time.perf_counter() - t0, 3)
            self.ctx.save_manifest()
            raise
        record.seconds = round(time.perf_counter() - t0, 3)
        record.counts = dict(counts)
        if not self.processes.is_main:
            record.status = "done"  # the main process records the stage and its outputs
            return record
        record.output_digest = outputs_digest(stage.outputs(self.ctx))
        record.status = "done"
        record.finished_at = _now()
        self.ctx.save_manifest()
        log.info("stage %-11s done in %.1fs %s", stage.name, record.seconds, record.counts)
        return record
