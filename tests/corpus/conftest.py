"""Fixtures of the corpus tests: image files of every kind, an isolated `datasets` cache."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from builder.corpus.shapes import shape_sample


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def shape() -> Callable[[int], Image.Image]:
    """The built-in shapes corpus's image `i` (distinct pixels for distinct i)."""
    return lambda i: shape_sample(i)[0]


@pytest.fixture
def image_bytes() -> Callable[[Image.Image, str], bytes]:
    return encode


@pytest.fixture
def write_folder() -> Callable[[Path, list[dict], dict[str, bytes]], Path]:
    """Write a `folder` corpus: captions.jsonl lines and image files (relative path -> bytes)."""

    def write(root: Path, lines: list[dict], files: dict[str, bytes]) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        (root / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return root

    return write


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`load_dataset` caches under the test's folder, and the hf reader's loaded datasets are forgotten."""
    import datasets

    from builder.corpus import hf

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    hf._load_cached.cache_clear()
    hf._root_of.cache_clear()
    yield cache
    hf._load_cached.cache_clear()
    hf._root_of.cache_clear()


@pytest.fixture
def run_corpus(tmp_path: Path):
    """Run the corpus stage alone on a recipe's corpus section; returns (samples, skip rows, counts, run dir)."""
    from builder.config import recipe_from_dict
    from builder.corpus.stage import CorpusStage, read_samples
    from builder.run import Executor

    def run(out: str = "run", text_source: str = "caption", **corpus):
        recipe = recipe_from_dict({"corpus": corpus, "text": {"source": text_source}})
        ex = Executor(recipe, tmp_path / out, [CorpusStage()])
        ex.run()
        rd = ex.run_dir
        return read_samples(rd.samples), rd.skipped_rows(), ex.manifest.stages["corpus"].counts, rd

    return run
