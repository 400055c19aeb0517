"""The package stage: the run's results as a Hugging Face dataset folder.

`dataset/` holds one parquet folder per config (see `builder.package.configs.CONFIGS`;
`neurons` is the default), the analyses' plots, `recipe.json`, `build_info.json` and a
README.md card whose YAML `configs:` make `load_dataset(dataset_dir, config)` work exactly
as on the Hub. Every config is cast to its declared Features and written in a stable row
order, so packaging the same run twice gives byte-identical parquet files. The folder is
built beside the old one and swapped in at the end: a kill never leaves a half-written
dataset folder.
"""

from __future__ import annotations

import json

import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Features

from builder.errors import StageError
from builder.io import public_name, write_text
from builder.package.build_info import BUILD_INFO, BuildInfo, ConfigInfo, ModelInfo
from builder.package.card import (
    Plot,
    PublishedConfig,
    card_license,
    example_exemplars,
    example_neurons,
    feature_type,
    render_card,
    score_summary,
    yaml_header,
)
from builder.package.configs import CONFIGS, ConfigSpec, config_spec
from builder.package.parquet import MB, ParquetLimits, has_images, write_shards
from builder.progress import progress
from builder.run import RunContext


def conform(spec: ConfigSpec, table: pa.Table, features: Features) -> pa.Table:
    """`table` with exactly the declared columns, cast to `features`, in the config's row order.

    A missing or undeclared column, or a value that does not fit its feature (e.g. a
    heatmap of the wrong shape), is a StageError naming the source file and the column.
    """
    from datasets.table import cast_array_to_feature

    names = list(features)
    twice = sorted({n for n in table.column_names if table.column_names.count(n) > 1})
    if twice:
        raise StageError(f"{spec.source}: columns {twice} appear twice in the {spec.name!r} config's source table")
    missing = [n for n in names if n not in table.column_names and n not in spec.fill_null]
    if missing:
        raise StageError(
            f"{spec.source}: columns {missing} of the {spec.name!r} config are missing; the {spec.stage} "
            "stage must write every column declared in builder/package/features.py"
        )
    extra = [n for n in table.column_names if n not in features]
    if extra:
        raise StageError(
            f"{spec.source}: columns {extra} are not declared for the {spec.name!r} config; declare them "
            "in builder/package/features.py so they are published with a type"
        )
    schema = features.arrow_schema
    arrays = []
    for name in names:
        if name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, schema.field(name).type))
            continue
        try:
            arrays.append(cast_array_to_feature(table[name], features[name]))
        except (TypeError, ValueError, pa.ArrowInvalid) as e:
            raise StageError(
                f"{spec.source}: column {name!r} does not fit its declared feature "
                f"{feature_type(features[name])} ({str(e).splitlines()[0]}); fix the {spec.stage} stage's output"
            ) from e
    cast = pa.Table.from_arrays(arrays, schema=schema)
    return cast.sort_by([(c, "ascending") for c in spec.sort_by])


def model_grid(manifest_model: dict[str, Any]) -> tuple[int, int] | None:
    grid = manifest_model.get("image_grid")
    return (int(grid[0]), int(grid[1])) if grid else None


def draw_plots(neurons: pa.Table, layers: pa.Table, out_dir: Path, confidence: float) -> list[Plot]:
    """The paper's per-layer analyses as PNGs in `out_dir` (builder.plots)."""
    try:
        from builder.plots import render_plots
    except ImportError as e:
        raise StageError(
            f"the package stage draws the card's plots with builder.plots.render_plots, which cannot be "
            f"imported ({e}); reinstall the builder (pip install -e .)"
        ) from e
    plots = render_plots(neurons, layers, out_dir, confidence)
    return [Plot(p.title, f"{out_dir.name}/{p.filename}", p.description) for p in plots]


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a finished folder in for `target` (two renames; the old folder goes last)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


class PackageStage:
    name = "package"
    version = "3"
    sections = ("package", "model", "corpus", "publish", "exemplars", "explain", "simulate")

    def source_fingerprint(self, ctx: RunContext) -> str:
        return ""

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.dataset]

    def run(self, ctx: RunContext) -> dict[str, int]:
        rd = ctx.run_dir
        cfg = ctx.recipe.package
        limits = ParquetLimits(int(cfg.max_shard_mb * MB), int(cfg.row_group_mb * MB), cfg.image_rows_per_group)
        grid = model_grid(ctx.manifest.model)
        present = []
        for spec in CONFIGS:
            if (rd.root / spec.source).exists():
                present.append(spec)
            elif spec.required:
                raise StageError(f"{rd.root / spec.source} is missing: run the {spec.stage} stage first")
        staging = rd.path(".dataset.partial")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        published: list[PublishedConfig] = []
        tables: dict[str, pa.Table] = {}
        with progress() as bar:
            task = bar.add_task("package: writing configs", total=len(present))
            for spec in present:
                features = spec.features(grid)
                table = conform(spec, spec.read(rd.root), features)
                paths = write_shards(staging / spec.name, table, features, limits)
                published.append(PublishedConfig(
                    spec, features, table.num_rows, table.nbytes, sum(p.stat().st_size for p in paths),
                    tuple(f"{spec.name}/{p.name}" for p in paths)))
                if not has_images(features):  # the card and plots need the small tables only
                    tables[spec.name] = table
                bar.advance(task)
        plots = draw_plots(tables["neurons"], tables["layers"], staging / "plots", ctx.recipe.classify.confidence)
        info = self.build_info(ctx, published, plots, grid)
        write_text(staging / "recipe.json", json.dumps(public_recipe(ctx.recipe), indent=2, sort_keys=True) + "\n")
        write_text(staging / BUILD_INFO, info.to_json())
        explanations = tables.get("explanations")
        examples = (example_neurons(explanations, tables["neurons"], ctx.recipe.package.card_examples)
                    if explanations is not None else [])
        example_exemplars(rd.path(config_spec("exemplars").source), examples, staging / "plots" / "examples")
        write_text(staging / "README.md", card_text(ctx, published, tables, plots, info, examples))
        replace_dir(staging, rd.dataset)
        counts = {c.spec.name: c.rows for c in published}
        counts["plots"] = len(plots)
        return counts

    @staticmethod
    def build_info(ctx: RunContext, published: list[PublishedConfig], plots: list[Plot],
                   grid: tuple[int, int] | None) -> BuildInfo:
        m = ctx.manifest
        r = ctx.recipe
        neurons_rows = next(c.rows for c in published if c.spec.name == "neurons")
        layers_rows = next(c.rows for c in published if c.spec.name == "layers")
        return BuildInfo(
            dataset_version=r.package.version,
            recipe=r.recipe.name,
            builder_version=m.package.get("version", ""),
            builder_commit=m.package.get("git_commit", ""),
            model=ModelInfo(
                id=public_name(r.model.id),
                revision=r.model.revision,
                resolved_revision=str(m.model.get("resolved_revision", "")),
                layers=int(m.model.get("layers", layers_rows)),
                neurons_per_layer=int(m.model.get("neurons_per_layer", neurons_rows // max(layers_rows, 1))),
                image_grid=list(grid) if grid else None,
            ),
            corpus={"kind": r.corpus.kind, "path": public_name(r.corpus.path),
                    "fingerprint": str(m.corpus.get("fingerprint", ""))},
            configs={
                c.spec.name: ConfigInfo(
                    rows=c.rows,
                    files=list(c.files),
                    num_bytes=c.num_bytes,
                    download_size=c.download_size,
                )
                for c in published
            },
            stage_counts={name: dict(rec.counts) for name, rec in m.stages.items()
                          if rec.status == "done" and name not in ("package", "validate")},
            plots=[{"title": p.title, "path": p.path} for p in plots],
        )


def _distinct(table: pa.Table | None, column: str) -> list[str]:
    """The distinct non-null values of a column, sorted ([] without the table)."""
    if table is None:
        return []
    return sorted({v for v in table.column(column).to_pylist() if v})


def card_text(ctx: RunContext, published: list[PublishedConfig], tables: dict[str, pa.Table], plots: list[Plot],
              info: BuildInfo, examples: list[dict[str, Any]]) -> str:
    from builder.classify import CATEGORIES

    r = ctx.recipe
    m = ctx.manifest
    neurons = tables["neurons"]
    cats = neurons.column("category").to_pylist()
    high = neurons.column("high_confidence").to_pylist()
    categories = [
        {"name": c, "count": cats.count(c), "fraction": cats.count(c) / max(len(cats), 1),
         "high": sum(1 for k, h in zip(cats, high) if k == c and h)}
        for c in CATEGORIES
    ]
    corpus_counts = info.stage_counts.get("corpus", {})
    skipped_reasons = {k.removeprefix("skipped_"): v for k, v in sorted(corpus_counts.items())
                       if k.startswith("skipped_")}
    pretty = r.package.pretty_name or f"{public_name(r.model.id).split('/')[-1].removeprefix('builtin:')} neurons"
    license_meta = card_license(r.model.license, r.corpus.license)
    explanations = tables.get("explanations")
    corpus_stage = m.stages.get("corpus")
    year = (corpus_stage.finished_at[:4] if corpus_stage and corpus_stage.finished_at else "") or "2025"
    return render_card({
        "yaml_header": yaml_header(published, license_meta, pretty),
        "pretty_name": pretty,
        "version": r.package.version,
        "model": info.model,
        "model_license": r.model.license,
        "corpus": info.corpus,
        "corpus_license": r.corpus.license,
        "license": license_meta,
        "counts": {"neurons": neurons.num_rows, "samples": tables["samples"].num_rows,
                   "skipped": corpus_counts.get("skipped", 0), "dead": sum(neurons.column("dead").to_pylist())},
        "skipped_reasons": skipped_reasons,
        "configs": [{"name": c.spec.name, "row": c.spec.row, "rows": c.rows, "default": c.spec.default,
                     "columns": [(k, feature_type(v)) for k, v in c.features.items()]} for c in published],
        "repo": r.publish.repo,
        "categories": categories,
        "plots": plots,
        "method": {"hook": r.capture.hook, "prompt": r.text.prompt, "text_source": r.text.source,
                   "top_n": r.classify.top_n, "visual_min_tokens": r.classify.visual_min_tokens,
                   "visual_threshold": r.classify.visual_threshold, "text_min_tokens": r.classify.text_min_tokens,
                   "text_threshold": r.classify.text_threshold, "op": ">" if r.classify.strict else ">=",
                   "tie_break": " > ".join(r.classify.tie_break), "confidence": r.classify.confidence},
        "explain": {"explainers": _distinct(explanations, "explainer"), "simulators": _distinct(explanations, "simulator"),
                    "prompt_versions": _distinct(explanations, "prompt_version"),
                    "shown": r.exemplars.shown, "held_out": r.exemplars.held_out,
                    "random_samples": r.simulate.random_samples, "multimodal_score": r.simulate.multimodal_score},
        "examples": examples,
        "scores": score_summary(explanations, CATEGORIES) if explanations is not None else [],
        "has_exemplars": any(c.spec.name == "exemplars" for c in published),
        "recipe_name": r.recipe.name,
        "builder": {"version": info.builder_version, "commit": info.builder_commit},
        "citation_key": re.sub(r"\W+", "_", r.publish.repo or pretty).strip("_").lower(),
        "year": year,
    })


PATH_KEYS = (("model", "id"), ("corpus", "path"), ("corpus", "image_root"), ("explain", "cache_path"),
             ("simulate", "detector"), ("simulate", "segmenter"))
"""Recipe keys that may name a local file or folder."""


def public_recipe(recipe: Any) -> dict[str, Any]:
    """The resolved recipe as published in `recipe.json`: local paths reduced by `public_name`
    (the run directory's manifest keeps them whole)."""
    data = json.loads(recipe.to_json())
    for section, key in PATH_KEYS:
        if isinstance(data.get(section, {}).get(key), str):
            data[section][key] = public_name(data[section][key])
    return data


__all__ = ["CONFIGS", "ConfigSpec", "PackageStage", "config_spec", "conform"]
