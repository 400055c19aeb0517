"""The published configs, each declared once: what a row is, its Features, where it comes from.

The package stage publishes every config whose source file exists in the run directory
(`required` ones must exist); validation and the card read the same declarations. To
publish a new config, add a :class:`ConfigSpec` to :data:`CONFIGS` and its Features to
`builder/package/features.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from builder.package import features as F

Grid = tuple[int, int]


@dataclass(frozen=True)
class ConfigSpec:
    """One published config."""

    name: str
    """Config name on the Hub (`load_dataset(repo, name)`) and folder name in `dataset/`."""
    row: str
    """What one row is, for the card."""
    stage: str
    """The stage that writes the source file (named in errors)."""
    source: str
    """File in the run directory the config is built from."""
    sort_by: tuple[str, ...]
    """Columns giving the published row order; together they are unique."""
    features: Callable[[Grid | None], Features]
    """The config's Features, given the model's image grid (H, W) when it is known."""
    default: bool = False
    """The config `load_dataset(repo)` loads without a name."""
    required: bool = False
    """The build fails when the source is missing (otherwise the config is left out)."""
    fill_null: tuple[str, ...] = ()
    """Declared columns the source may lack (published as nulls)."""
    load: Callable[[Path], pa.Table] | None = None
    """Reads the source table from the run directory (default: the parquet file `source`)."""
    manifest_count: tuple[str, str] | None = None
    """(stage, counts key) in the manifest that must equal the number of rows."""

    def read(self, run_dir: Path) -> pa.Table:
        return self.load(run_dir) if self.load else pq.read_table(run_dir / self.source)


def _categories() -> tuple[str, ...]:
    from builder.classify import CATEGORIES

    return CATEGORIES


def _samples(run_dir: Path) -> pa.Table:
    """samples.parquet joined with texts.parquet: the text each sample was recorded with."""
    samples = pq.read_table(run_dir / "samples.parquet", columns=["sample_id", "source_id", "caption"])
    texts = pq.read_table(run_dir / "texts.parquet", columns=["sample_id", "text", "text_source"])
    joined = samples.join(texts, "sample_id", join_type="left outer")
    missing = joined.filter(joined["text"].is_null()).column("sample_id").to_pylist()
    if missing:
        from builder.errors import StageError

        raise StageError(
            f"texts.parquet has no text for {len(missing)} samples (e.g. {missing[:3]}); "
            "rerun with --force text"
        )
    return joined


def _exemplar_features(grid: Grid | None) -> Features:
    if grid is None:
        from builder.errors import StageError

        raise StageError(
            "the exemplars config needs the model's image grid, which the manifest does not record "
            "(manifest.json model.image_grid); rerun with --force capture"
        )
    return F.exemplars_features(grid)


def _explanations(run_dir: Path) -> pa.Table:
    """explanations.parquet with the score columns of the simulate stage's scores.parquet
    (nulls where an explanation was not scored, or before the simulate stage ran)."""
    from builder.simulate.publish import explanations_with_scores

    return explanations_with_scores(run_dir)


CONFIGS: tuple[ConfigSpec, ...] = (
    ConfigSpec(
        name="neurons",
        row="neuron",
        stage="classify",
        source="neurons.parquet",
        sort_by=("layer", "neuron"),
        features=lambda grid: F.NEURONS,
        default=True,
        required=True,
        manifest_count=("classify", "neurons"),
    ),
    ConfigSpec(
        name="layers",
        row="layer",
        stage="classify",
        source="layers.parquet",
        sort_by=("layer",),
        features=lambda grid: F.layers_features(_categories()),
        required=True,
    ),
    ConfigSpec(
        name="samples",
        row="corpus sample",
        stage="corpus",
        source="samples.parquet",
        sort_by=("sample_id",),
        features=lambda grid: F.SAMPLES,
        required=True,
        load=_samples,
        manifest_count=("corpus", "samples"),
    ),
    ConfigSpec(
        name="exemplars",
        row="(neuron, rank): one top sample of an explained neuron",
        stage="exemplars",
        source="exemplars.parquet",
        sort_by=("layer", "neuron", "rank"),
        features=_exemplar_features,
        manifest_count=("exemplars", "exemplars"),
    ),
    ConfigSpec(
        name="explanations",
        row="explained neuron",
        stage="explain",
        source="explanations.parquet",
        sort_by=("layer", "neuron"),
        features=lambda grid: F.EXPLANATIONS,
        fill_null=F.EXPLANATION_SCORE_COLUMNS,
        load=_explanations,  # simulate stage (issue 8): scores.parquet joined on (layer, neuron)
        manifest_count=("explain", "neurons"),
    ),
)


def config_spec(name: str) -> ConfigSpec | None:
    return next((c for c in CONFIGS if c.name == name), None)
