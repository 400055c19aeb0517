"""The checks. Each check reads the folder fresh with pyarrow (never a `datasets` cache)."""

from __future__ import annotations

import glob
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

CATEGORIES = ("visual", "text", "multimodal", "unknown")
FRACTION_COLUMNS = ["p_visual", "p_text", "p_multimodal", "p_unknown"]
SUM_TOLERANCE = 1e-5


@dataclass
class Check:
    """The outcome of one check."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    """Every check run over a dataset folder."""

    path: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def render(self) -> str:
        lines = [f"validation of {self.path}"]
        for c in self.checks:
            lines.append(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}" + (f": {c.detail}" if c.detail else ""))
        lines.append(f"{sum(c.ok for c in self.checks)} passed, {len(self.failures)} failed")
        return "\n".join(lines)


class DatasetFolder:
    """Lazy, fresh reads of a dataset folder's configs."""

    def __init__(self, root: Path):
        self.root = root
        self._tables: dict[str, pa.Table] = {}

    def files(self, config: str) -> list[Path]:
        return sorted((self.root / config).glob("*.parquet"))

    def has(self, config: str) -> bool:
        return bool(self.files(config))

    def table(self, config: str) -> pa.Table:
        if config not in self._tables:
            self._tables[config] = pa.concat_tables([pq.read_table(f) for f in self.files(config)])
        return self._tables[config]

    def frame(self, config: str) -> pd.DataFrame:
        return self.table(config).to_pandas()

    def recipe(self) -> dict:
        path = self.root / "recipe.json"
        return json.loads(path.read_text()) if path.exists() else {}


CheckFn = Callable[[DatasetFolder], list[Check]]
CHECKS: list[CheckFn] = []


def check(fn: CheckFn) -> CheckFn:
    CHECKS.append(fn)
    return fn


@check
def card_configs_match_files(ds: DatasetFolder) -> list[Check]:
    readme = ds.root / "README.md"
    if not readme.exists():
        return [Check("card", False, "README.md missing")]
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return [Check("card", False, "README.md has no YAML header")]
    try:
        header = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError as e:
        return [Check("card", False, f"YAML header does not parse: {e}")]
    out = []
    listed = set()
    for cfg in header.get("configs", []):
        name = cfg.get("config_name", "?")
        listed.add(name)
        for df in cfg.get("data_files", []):
            pattern = df.get("path", "")
            matched = glob.glob(str(ds.root / pattern))
            out.append(Check(f"card config {name!r} files", bool(matched),
                             "" if matched else f"data_files path {pattern!r} matches no file"))
    on_disk = {p.name for p in ds.root.iterdir() if p.is_dir() and any(p.glob("*.parquet"))}
    unlisted = sorted(on_disk - listed)
    out.append(Check("every parquet folder is a card config", not unlisted,
                     f"not in the card's configs: {unlisted}" if unlisted else ""))
    out.append(Check("neurons config present", "neurons" in listed and ds.has("neurons"),
                     "" if "neurons" in listed and ds.has("neurons") else "the default `neurons` config is missing"))
    return out


@check
def schemas_match_features(ds: DatasetFolder) -> list[Check]:
    from validation.schemas import expected_schemas

    out = []
    for config, schema in expected_schemas().items():
        if not ds.has(config):
            continue
        for f in ds.files(config):
            actual = pq.read_schema(f).remove_metadata()
            missing = [n for n in schema.names if n not in actual.names]
            extra = [n for n in actual.names if n not in schema.names]
            wrong = [f"{n}: {actual.field(n).type} != {schema.field(n).type}" for n in schema.names
                     if n in actual.names and not actual.field(n).type.equals(schema.field(n).type)]
            problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []) + wrong
            out.append(Check(f"schema {config}/{f.name}", not problems, "; ".join(problems)))
    return out


def _first(mask: pd.Series, frame: pd.DataFrame, cols: list[str]) -> str:
    rows = frame.loc[mask, cols].head(3).to_dict("records")
    return f"{int(mask.sum())} rows, e.g. {rows}"


@check
def neuron_invariants(ds: DatasetFolder) -> list[Check]:
    if not ds.has("neurons"):
        return []
    df = ds.frame("neurons")
    key = ["layer", "neuron"]
    out = []
    dup = df.duplicated(key, keep=False)
    out.append(Check("neurons: (layer, neuron) unique", not dup.any(), _first(dup, df, key) if dup.any() else ""))
    frac = df[FRACTION_COLUMNS]
    bad = ((frac < 0) | (frac > 1) | frac.isna()).any(axis=1)
    out.append(Check("neurons: fractions in [0, 1]", not bad.any(), _first(bad, df, key + FRACTION_COLUMNS) if bad.any() else ""))
    sums = frac.sum(axis=1)
    bad_sum = (sums - 1).abs() > SUM_TOLERANCE
    out.append(Check("neurons: fractions sum to 1", not bad_sum.any(),
                     _first(bad_sum, df, key + FRACTION_COLUMNS) if bad_sum.any() else ""))
    bad_cat = ~df["category"].isin(CATEGORIES)
    out.append(Check("neurons: category is a known category", not bad_cat.any(),
                     _first(bad_cat, df, key + ["category"]) if bad_cat.any() else ""))
    # The category's fraction must be the maximum and equal the confidence.
    cat_idx = df["category"].map({c: i for i, c in enumerate(CATEGORIES)}).fillna(0).astype(int).to_numpy()
    fvals = frac.to_numpy()
    cat_frac = fvals[np.arange(len(df)), cat_idx]
    contradicts = pd.Series((cat_frac + 1e-6 < fvals.max(axis=1)) | (np.abs(cat_frac - df["confidence"]) > 1e-6),
                            index=df.index)
    out.append(Check("neurons: category and confidence agree with the fractions", not contradicts.any(),
                     _first(contradicts, df, key + ["category", "confidence"] + FRACTION_COLUMNS) if contradicts.any() else ""))
    threshold = ds.recipe().get("classify", {}).get("confidence")
    if threshold is not None:
        wrong_hc = df["high_confidence"] != (df["confidence"] > threshold)
        out.append(Check(f"neurons: high_confidence == confidence > {threshold}", not wrong_hc.any(),
                         _first(wrong_hc, df, key + ["confidence", "high_confidence"]) if wrong_hc.any() else ""))
    bad_max = ~np.isfinite(df["max_activation"])
    out.append(Check("neurons: max_activation finite", not bad_max.any(),
                     _first(bad_max, df, key + ["max_activation"]) if bad_max.any() else ""))
    return out


@check
def layers_match_neurons(ds: DatasetFolder) -> list[Check]:
    if not (ds.has("layers") and ds.has("neurons")):
        return []
    layers = ds.frame("layers").set_index("layer")
    neurons = ds.frame("neurons")
    counts = neurons.groupby(["layer", "category"]).size().unstack(fill_value=0)
    problems = []
    for layer, row in layers.iterrows():
        for c in CATEGORIES:
            expected = int(counts.loc[layer, c]) if layer in counts.index and c in counts.columns else 0
            if int(row[f"n_{c}"]) != expected:
                problems.append(f"layer {layer} n_{c}={int(row[f'n_{c}'])}, neurons say {expected}")
    if set(layers.index) != set(neurons["layer"].unique()):
        problems.append("layer sets differ between layers and neurons")
    return [Check("layers: counts match neurons", not problems, "; ".join(problems[:5]))]


@check
def references_resolve(ds: DatasetFolder) -> list[Check]:
    if not (ds.has("neurons") and ds.has("samples")):
        return []
    samples = ds.frame("samples")
    dup = samples["sample_id"].duplicated(keep=False)
    out = [Check("samples: sample_id unique", not dup.any(), _first(dup, samples, ["sample_id"]) if dup.any() else "")]
    known = set(samples["sample_id"])
    top = ds.table("neurons").column("top_sample_ids").combine_chunks().flatten().to_pylist()
    dangling = sorted(set(top) - known)
    out.append(Check("neurons: top_sample_ids name existing samples", not dangling,
                     f"unknown sample ids: {dangling[:5]}" if dangling else ""))
    neuron_keys = set(zip(ds.table("neurons").column("layer").to_pylist(), ds.table("neurons").column("neuron").to_pylist()))
    for config in ("exemplars", "explanations"):
        if not ds.has(config):
            continue
        frame = ds.frame(config)
        keys = set(zip(frame["layer"], frame["neuron"]))
        missing = sorted(keys - neuron_keys)
        out.append(Check(f"{config}: every row names an existing neuron", not missing,
                         f"unknown neurons: {missing[:5]}" if missing else ""))
        if "sample_id" in frame:
            unknown = sorted(set(frame["sample_id"]) - known)
            out.append(Check(f"{config}: every row names an existing sample", not unknown,
                             f"unknown samples: {unknown[:5]}" if unknown else ""))
    return out


def validate_dataset(path: str | Path) -> Report:
    """Run every check over the dataset folder at `path`."""
    root = Path(path)
    report = Report(str(root))
    if not root.is_dir():
        report.checks.append(Check("dataset folder exists", False, f"{root} is not a directory"))
        return report
    ds = DatasetFolder(root)
    for fn in CHECKS:
        try:
            report.checks.extend(fn(ds))
        except Exception as e:  # a check that cannot even read its input is a failure, not a crash
            report.checks.append(Check(fn.__name__, False, f"{type(e).__name__}: {e}"))
    return report
