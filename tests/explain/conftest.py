"""Fixtures of the exemplars and explain tests: a small tiny-recipe run up to exemplars,
the fake OpenAI server, and a helper that runs the explain stage on a copy of the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.explain import fake_openai

HERE = Path(__file__).resolve().parent

SMALL = [
    "exemplars.per_category=2",
    "exemplars.shown=3",
    "exemplars.held_out=2",
    "exemplars.image_format=png",
]
"""A small selection (at most 4 layers x 3 categories x 2 neurons) keeps the tests fast."""

FAST_OPENAI = [
    "explain.backend=openai",
    "explain.timeout_seconds=0.5",
    "explain.retry_base_seconds=0.01",
    "explain.retry_max_seconds=0.05",
    "explain.max_attempts=8",
    "explain.max_concurrency=4",
]
"""The openai backend with timeouts and backoffs short enough for tests."""


@pytest.fixture
def fake_server():
    """A fresh fake endpoint; set `.faults` / `.latency` before sending."""
    with fake_openai.FakeOpenAI() as server:
        yield server


@pytest.fixture
def openai_env(fake_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    return fake_server


@pytest.fixture(scope="session")
def exemplar_run(builder_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe with a small selection, run up to the exemplars stage (read-only)."""
    from builder.config import load_recipe
    from builder.pipeline import default_stages
    from builder.run import Executor

    out = tmp_path_factory.mktemp("exemplar-run")
    Executor(load_recipe("tiny", SMALL), out, default_stages()).run(until="exemplars")
    return out


@pytest.fixture
def run_copy(exemplar_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(exemplar_run, dst)
    return dst


def context(run_dir: Path, overrides: list[str] = ()):
    from builder.config import load_recipe
    from builder.run import Manifest, RunContext, RunDir

    # The run's own manifest: a context that loads the model records it there, and an empty
    # manifest would erase the stages' records of the shared run.
    return RunContext(load_recipe("tiny", [*SMALL, *overrides]), RunDir(run_dir),
                      Manifest.load(run_dir / "manifest.json"))


def run_explain(run_dir: Path, overrides: list[str] = ()) -> tuple[dict[str, int], list[dict]]:
    """Run the explain stage alone on `run_dir`; (counts, rows of explanations.parquet)."""
    import pyarrow.parquet as pq

    from builder.explain.stage import EXPLANATIONS_FILE, ExplainStage

    counts = ExplainStage().run(context(run_dir, overrides))
    return counts, pq.read_table(run_dir / EXPLANATIONS_FILE).to_pylist()


@pytest.fixture
def ctx_for():
    """`ctx_for(run_dir, overrides)`: a RunContext of the small tiny recipe."""
    return context


@pytest.fixture
def explain_runner():
    """`explain_runner(run_dir, overrides)`: run the explain stage, return (counts, rows)."""
    return run_explain


@pytest.fixture
def fake_module():
    return fake_openai


@pytest.fixture
def small() -> list[str]:
    """The recipe overrides of `exemplar_run` (a rerun with the same ones skips its stages)."""
    return list(SMALL)
