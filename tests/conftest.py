"""Shared fixtures: an isolated model cache per test session, no progress bars, quiet libraries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("BUILDER_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def builder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are saved here once per session (never in the user's home)."""
    from builder.quiet import quiet_libraries

    quiet_libraries()
    root = tmp_path_factory.mktemp("builder-cache")
    os.environ["BUILDER_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_vlm(builder_cache: Path):
    """The built-in tiny LLaVA, loaded through the real `from_pretrained` path."""
    from builder.config import ModelConfig
    from builder.models.loading import load_vlm

    return load_vlm(ModelConfig(id="builtin:tiny-llava", device="cpu"))


@pytest.fixture(scope="session")
def tiny_run(builder_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `--recipe tiny` build (shared, read-only: copy it before changing it)."""
    from builder.config import load_recipe
    from builder.pipeline import default_stages
    from builder.run import Executor

    out = tmp_path_factory.mktemp("tiny-run")
    Executor(load_recipe("tiny"), out, default_stages()).run()
    return out
