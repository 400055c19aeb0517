"""`dataset/build_info.json`: what validation needs to know about the build that made a folder.

It records the model's shape and image grid (heatmap shapes are checked against it), each
config's files and row count, and the manifest's per-stage counts, so a dataset folder
can be checked on its own, away from its run directory. It holds no secret, no local path
and no timestamp: packaging the same run twice writes the same file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUILD_INFO = "build_info.json"
BUILD_INFO_SCHEMA = 1


@dataclass(frozen=True)
class ConfigInfo:
    """One published config as written."""

    rows: int
    """Rows over all its shards."""
    files: list[str]
    """Its parquet files, relative to the dataset folder."""
    num_bytes: int
    """Uncompressed Arrow size (the card's `dataset_size`)."""
    download_size: int
    """Bytes of its parquet files."""


@dataclass(frozen=True)
class ModelInfo:
    """The model whose neurons the dataset describes."""

    id: str
    revision: str | None
    """Requested revision (None: the default branch)."""
    resolved_revision: str
    """Commit the revision resolved to ('' for local folders and built-in models)."""
    layers: int
    neurons_per_layer: int
    image_grid: list[int] | None
    """[H, W] of the image-token patch grid (the heatmaps' shape); None when unknown."""


@dataclass(frozen=True)
class BuildInfo:
    """Provenance and counts of a packaged dataset folder."""

    dataset_version: str
    """`package.version`; published as the tag `v<version>`."""
    recipe: str
    """Recipe name (the whole resolved recipe is `recipe.json`)."""
    builder_version: str
    builder_commit: str
    """Git commit of the builder's source ('' when installed from a wheel)."""
    model: ModelInfo
    corpus: dict[str, str]
    """kind, path and fingerprint (hash of the corpus stage's samples.parquet)."""
    configs: dict[str, ConfigInfo]
    stage_counts: dict[str, dict[str, int]]
    """Each finished upstream stage's counts, as in manifest.json."""
    plots: list[dict[str, str]] = field(default_factory=list)
    """title and path (relative to the dataset folder) of each plot in the card."""
    schema_version: int = BUILD_INFO_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildInfo:
        data = dict(data)
        if data.get("schema_version") != BUILD_INFO_SCHEMA:
            raise ValueError(f"schema_version {data.get('schema_version')!r}, expected {BUILD_INFO_SCHEMA}")
        data["model"] = ModelInfo(**data["model"])
        data["configs"] = {k: ConfigInfo(**v) for k, v in data["configs"].items()}
        return cls(**data)

    @classmethod
    def read(cls, dataset_dir: Path) -> BuildInfo:
        return cls.from_dict(json.loads((dataset_dir / BUILD_INFO).read_text(encoding="utf-8")))

    @property
    def grid(self) -> tuple[int, int] | None:
        g = self.model.image_grid
        return (int(g[0]), int(g[1])) if g else None
