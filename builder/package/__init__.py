"""The package stage: the run's results as a Hugging Face dataset folder.

`dataset/` holds one parquet folder per config (`neurons` is the default) and a README.md
card whose YAML `configs:` make `load_dataset(dataset_dir, config)` work exactly as it
does on the Hub. Parquet files are written with the declared `datasets.Features`, in a
stable row order, so packaging the same run twice gives byte-identical files.
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from builder.io import write_text, write_with
from builder.run import RunContext


@dataclass(frozen=True)
class ConfigSpec:
    """One published config."""

    name: str
    row: str
    """What one row is, for the card."""
    default: bool = False


def shard_name(index: int = 0, total: int = 1) -> str:
    return f"train-{index:05d}-of-{total:05d}.parquet"


def cards_dir() -> Path:
    from importlib import resources

    packaged = Path(str(resources.files("builder"))) / "cards"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "cards"


def write_config(dataset_dir: Path, name: str, table: pa.Table, features: Any, rows_per_group: int = 10_000) -> Path:
    """Write one config as parquet with its Features in the schema metadata."""
    schema = features.arrow_schema  # carries the Features as `huggingface` metadata
    arrow = table.select(schema.names).cast(schema).combine_chunks()
    folder = dataset_dir / name
    if folder.exists():
        shutil.rmtree(folder)
    path = folder / shard_name()
    write_with(
        path,
        lambda tmp: pq.write_table(
            arrow,
            tmp,
            row_group_size=rows_per_group,
            compression="zstd",
            write_page_index=True,
            write_statistics=True,
        ),
    )
    return path


def yaml_header(configs: list[ConfigSpec], license_id: str, tags: list[str], size_category: str,
                pretty_name: str) -> str:
    meta = {
        "license": license_id,
        "pretty_name": pretty_name,
        "tags": tags,
        "task_categories": ["image-text-to-text"],
        "size_categories": [size_category],
        "configs": [
            {"config_name": c.name, "data_files": [{"split": "train", "path": f"{c.name}/train-*.parquet"}],
             **({"default": True} if c.default else {})}
            for c in configs
        ],
    }
    return yaml.safe_dump(meta, sort_keys=False).strip()


def size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M"


def card_license(model_license: str, corpus_license: str) -> str:
    """The dataset inherits the more restrictive of its sources: 'other' unless both agree."""
    return model_license if model_license == corpus_license else "other"


def read_card_configs(dataset_dir: Path) -> list[dict[str, Any]]:
    """The `configs:` list of a dataset folder's README.md YAML header."""
    text = (dataset_dir / "README.md").read_text(encoding="utf-8")
    if not text.startswith("---"):
        return []
    header = text.split("---", 2)[1]
    return list((yaml.safe_load(header) or {}).get("configs", []))


class PackageStage:
    name = "package"
    version = "1"
    sections = ("package", "model", "corpus", "publish")

    def source_fingerprint(self, ctx: RunContext) -> str:
        return ""

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.dataset]

    def run(self, ctx: RunContext) -> dict[str, int]:
        from builder.classify import CATEGORIES
        from builder.package import features as F

        rd = ctx.run_dir
        out = rd.dataset
        out.mkdir(parents=True, exist_ok=True)
        neurons = pq.read_table(rd.neurons).sort_by([("layer", "ascending"), ("neuron", "ascending")])
        layers = pq.read_table(rd.layers).sort_by([("layer", "ascending")])
        samples = pq.read_table(rd.samples)
        texts = pq.read_table(rd.texts)
        text_by_id = {r["sample_id"]: r for r in texts.to_pylist()}
        sample_rows = [
            {"sample_id": s["sample_id"], "source_id": s["source_id"], "text": text_by_id[s["sample_id"]]["text"],
             "text_source": text_by_id[s["sample_id"]]["text_source"], "caption": s["caption"]}
            for s in samples.to_pylist()
        ]
        samples_table = pa.Table.from_pylist(sample_rows).sort_by([("sample_id", "ascending")])
        specs = [
            ConfigSpec("neurons", "neuron", default=True),
            ConfigSpec("layers", "layer"),
            ConfigSpec("samples", "corpus sample"),
        ]
        tables = {"neurons": (neurons, F.NEURONS), "layers": (layers, F.layers_features(CATEGORIES)),
                  "samples": (samples_table, F.SAMPLES)}
        for spec in specs:
            table, feats = tables[spec.name]
            write_config(out, spec.name, table, feats)
        write_text(out / "recipe.json", ctx.recipe.to_json() + "\n")
        card = render_card(ctx, specs, {k: v[0].num_rows for k, v in tables.items()}, neurons, layers)
        write_text(out / "README.md", card)
        return {name: t.num_rows for name, (t, _) in tables.items()}


def render_card(ctx: RunContext, specs: list[ConfigSpec], rows: dict[str, int], neurons: pa.Table,
                layers: pa.Table) -> str:
    import jinja2

    from builder.classify import CATEGORIES

    r = ctx.recipe
    m = ctx.manifest
    corpus_counts = m.stages["corpus"].counts if "corpus" in m.stages else {}
    cats = neurons.column("category").to_pylist()
    high = neurons.column("high_confidence").to_pylist()
    categories = [
        {"name": c, "count": cats.count(c), "fraction": cats.count(c) / max(len(cats), 1),
         "high": sum(1 for k, h in zip(cats, high) if k == c and h)}
        for c in CATEGORIES
    ]
    skipped_reasons = {k.removeprefix("skipped_"): v for k, v in corpus_counts.items()
                       if k.startswith("skipped_")}
    pretty = r.package.pretty_name or f"{r.model.id.split('/')[-1]} neurons"
    lic = card_license(r.model.license, r.corpus.license)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(cards_dir())), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    template = env.get_template("dataset_card.md.j2")
    return template.render(
        yaml_header=yaml_header(specs, lic, ["interpretability", "neurons", "vision-language-models"],
                                size_category(rows["neurons"]), pretty),
        pretty_name=pretty,
        model={"id": r.model.id, "layers": m.model.get("layers", layers.num_rows),
               "neurons_per_layer": m.model.get("neurons_per_layer", rows["neurons"] // max(layers.num_rows, 1)),
               "resolved_revision": m.model.get("resolved_revision", "")},
        model_license=r.model.license,
        corpus={"kind": r.corpus.kind, "path": r.corpus.path, "fingerprint": m.corpus.get("fingerprint", "")},
        corpus_license=r.corpus.license,
        version=r.package.version,
        counts={"neurons": rows["neurons"], "samples": rows["samples"], "skipped": corpus_counts.get("skipped", 0)},
        configs=[{"name": s.name, "row": s.row, "rows": rows[s.name], "default": s.default} for s in specs],
        repo_or_path=r.publish.repo or "path/to/dataset",
        categories=categories,
        plots=[],
        method={"hook": r.capture.hook, "prompt": r.text.prompt, "text_source": r.text.source,
                "top_n": r.classify.top_n, "visual_min_tokens": r.classify.visual_min_tokens,
                "visual_threshold": r.classify.visual_threshold, "text_min_tokens": r.classify.text_min_tokens,
                "text_threshold": r.classify.text_threshold, "op": ">" if r.classify.strict else ">=",
                "tie_break": " > ".join(r.classify.tie_break), "confidence": r.classify.confidence},
        recipe_name=r.recipe.name,
        package=m.package,
        skipped_reasons=skipped_reasons,
        citation_key=(r.publish.repo or pretty).replace("/", "_").replace("-", "_").replace(" ", "_"),
        year=datetime.date.today().year,
    )


def manifest_counts(dataset_dir: Path) -> dict[str, Any]:
    """Rows per config as the files hold them (used by validation)."""
    return {p.name: pq.ParquetFile(next(p.glob("*.parquet"))).metadata.num_rows
            for p in sorted(dataset_dir.iterdir()) if p.is_dir() and any(p.glob("*.parquet"))}


__all__ = ["ConfigSpec", "PackageStage", "read_card_configs", "write_config"]
