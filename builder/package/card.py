"""The dataset card (README.md): YAML metadata from the libraries' own card types, body from
the `cards/dataset_card.md.j2` template.

The YAML header is built with `huggingface_hub.DatasetCardData` and
`datasets.DatasetInfosDict`, so `configs:` and `dataset_info:` (the Features) are written
exactly as the Hub and `load_dataset` read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from datasets import Features

from builder.package.configs import ConfigSpec

TAGS = ["interpretability", "mechanistic-interpretability", "neurons", "vision-language-models"]
TASK_CATEGORIES = ["image-text-to-text"]
CARD_TEMPLATE = "dataset_card.md.j2"


@dataclass(frozen=True)
class PublishedConfig:
    """A config as the card describes it."""

    spec: ConfigSpec
    features: Features
    rows: int
    num_bytes: int
    """Uncompressed Arrow size."""
    download_size: int
    """Bytes of its parquet files."""
    files: tuple[str, ...]
    """Its parquet files, relative to the dataset folder."""


@dataclass(frozen=True)
class Plot:
    """A plot in the card."""

    title: str
    path: str
    """Relative to the dataset folder."""
    description: str
    """One sentence saying what it shows."""


def cards_dir() -> Path:
    """The card templates: packaged as `builder/cards` in a wheel, `cards/` in a checkout."""
    from importlib import resources

    packaged = Path(str(resources.files("builder"))) / "cards"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "cards"


def size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def card_license(model_license: str, corpus_license: str) -> dict[str, str]:
    """The dataset's license metadata, derived from its two sources.

    The neurons derive from the model and the exemplars hold the corpus's images: when both
    sources have the same license the dataset has it too; otherwise it is `other`, named
    after both, and the card's License section states each one's terms apply.
    """
    if model_license == corpus_license and model_license != "other":
        return {"license": model_license}
    return {"license": "other", "license_name": f"{_slug(model_license)}-and-{_slug(corpus_license)}"}


def yaml_header(configs: list[PublishedConfig], license_meta: dict[str, str], pretty_name: str) -> str:
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCardData

    card = DatasetCardData(
        **license_meta,
        pretty_name=pretty_name,
        tags=TAGS,
        task_categories=TASK_CATEGORIES,
        size_categories=[size_category(next(c.rows for c in configs if c.spec.default))],
        configs=[
            {
                "config_name": c.spec.name,
                "data_files": [{"split": "train", "path": f"{c.spec.name}/train-*.parquet"}],
                **({"default": True} if c.spec.default else {}),
            }
            for c in configs
        ],
    )
    infos = {}
    for c in configs:
        splits = SplitDict()
        splits.add(SplitInfo(name="train", num_bytes=c.num_bytes, num_examples=c.rows))
        infos[c.spec.name] = DatasetInfo(
            features=c.features, splits=splits, download_size=c.download_size, dataset_size=c.num_bytes,
            config_name=c.spec.name,
        )
    DatasetInfosDict(infos).to_dataset_card_data(card)
    return card.to_yaml()


def read_card_header(dataset_dir: Path) -> dict[str, Any]:
    """The YAML header of a dataset folder's README.md ({} when it has none)."""
    text = (dataset_dir / "README.md").read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text.split("---", 2)[1]) or {}


def feature_type(feature: Any) -> str:
    """A short, readable type for the card's column tables."""
    from datasets import Image, List, Value

    if isinstance(feature, Value):
        return feature.dtype
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, List):
        inner = feature_type(feature.feature)
        return f"list[{inner}; {feature.length}]" if feature.length not in (None, -1) else f"list[{inner}]"
    if isinstance(feature, dict):
        return "{" + ", ".join(f"{k}: {feature_type(v)}" for k, v in feature.items()) + "}"
    return type(feature).__name__


def _cell(text: Any) -> str:
    """Markdown-table-safe text."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


EXAMPLE_EXEMPLARS = 4
"""Shown exemplars drawn per example neuron in the card."""


def example_exemplars(exemplars_path: Path, examples: list[dict[str, Any]], folder: Path) -> None:
    """Add to each example neuron of the card what its explainer was shown: a strip of its
    first shown activation-modulated images (visual, multimodal; written under `folder`,
    its path in `strip`) and the description tokens that carry its top activations (text,
    multimodal; `tokens`)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from builder.explain.offline import top_tokens
    from builder.explain.records import Exemplar, NeuronExemplars
    from builder.plots import exemplar_strip

    if not examples or not exemplars_path.exists():
        return
    table = pq.read_table(exemplars_path, filters=[("role", "==", "shown")])
    for e in examples:
        mine = table.filter(pc.and_(pc.equal(table["layer"], e["layer"]), pc.equal(table["neuron"], e["neuron"])))
        rows = sorted(mine.to_pylist(), key=lambda r: r["rank"])[:EXAMPLE_EXEMPLARS]
        if not rows:
            continue
        if e["category"] in ("visual", "multimodal"):
            name = f"L{e['layer']}-N{e['neuron']}.png"
            # The image column holds {bytes, path} (the exemplars stage) or the bytes alone.
            exemplar_strip([r["image"]["bytes"] if isinstance(r["image"], dict) else r["image"] for r in rows],
                           folder / name)
            e["strip"] = f"{folder.parent.name}/{folder.name}/{name}"
        if e["category"] in ("text", "multimodal"):
            neuron = NeuronExemplars(e["layer"], e["neuron"], e["category"], tuple(
                Exemplar(r["sample_id"], r["rank"], b"", tuple(r["tokens"]), tuple(r["token_activations"]))
                for r in rows))
            e["tokens"] = _cell(", ".join(repr(t.strip()) for t in top_tokens(neuron, 0.5, 3)))


def example_neurons(explanations: pa.Table, neurons: pa.Table, per_category: int) -> list[dict[str, Any]]:
    """The best-scored explained neurons of each category (by confidence before scoring)."""
    conf = {(r["layer"], r["neuron"]): r["confidence"]
            for r in neurons.select(["layer", "neuron", "confidence"]).to_pylist()}
    rows = [r for r in explanations.to_pylist() if r["status"] == "ok"]
    out = []
    for category in dict.fromkeys(r["category"] for r in rows):
        mine = [r for r in rows if r["category"] == category]
        mine.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0),
                                 -conf.get((r["layer"], r["neuron"]), 0.0), r["layer"], r["neuron"]))
        for r in mine[:per_category]:
            out.append({
                "layer": r["layer"], "neuron": r["neuron"], "category": category,
                "confidence": conf.get((r["layer"], r["neuron"])), "explanation": _cell(r["explanation"]),
                "score": r["score"], "baseline": r["baseline_score"],
                "strip": None, "tokens": "",  # filled by example_exemplars
            })
    return out


def _quartiles(values: list[float]) -> list[float] | None:
    """q25, median, q75 (simulate stage, issue 8: score and baseline distributions in the card)."""
    import numpy as np

    return [float(v) for v in np.quantile(values, [0.25, 0.5, 0.75])] if values else None


def score_summary(explanations: pa.Table, categories: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per category: explained, failed and scored neurons; the scores' mean and quartiles
    against the chance baselines' (the same simulator given another neuron's explanation)."""
    import numpy as np

    rows = explanations.to_pylist()
    out = []
    for c in categories:
        mine = [r for r in rows if r["category"] == c]
        if not mine:
            continue
        scored = [r for r in mine if r["score"] is not None]
        paired = [r for r in scored if r["baseline_score"] is not None]
        out.append({
            "category": c,
            "explained": sum(r["status"] == "ok" for r in mine),
            "failed": sum(r["status"] != "ok" for r in mine),
            "scored": len(scored),
            "mean_score": float(np.mean([r["score"] for r in scored])) if scored else None,
            "median_score": float(np.median([r["score"] for r in scored])) if scored else None,
            "mean_baseline": float(np.mean([r["baseline_score"] for r in paired])) if paired else None,
            "beats_baseline": (sum(r["score"] > r["baseline_score"] for r in paired) / len(paired)) if paired else None,
            "score_quartiles": _quartiles([r["score"] for r in scored]),
            "baseline_quartiles": _quartiles([r["baseline_score"] for r in paired]),
        })
    return out


def render_card(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(cards_dir())),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )
    env.filters["num"] = lambda v, fmt="%.3f": "-" if v is None else fmt % v
    return env.get_template(CARD_TEMPLATE).render(**context)


__all__ = [
    "Plot",
    "PublishedConfig",
    "card_license",
    "cards_dir",
    "example_neurons",
    "feature_type",
    "read_card_header",
    "render_card",
    "score_summary",
    "size_category",
    "yaml_header",
]
