"""The checks over a dataset folder. Every read is fresh, with pyarrow (never a `datasets` cache).

Each check function returns named :class:`Check` outcomes; `validate_dataset` runs them all
and a check that cannot even read its input is itself a failure, never a crash. Names read
`<area>: <rule>` (e.g. `neurons: fractions sum to 1`), so a report line says what is wrong.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pdr
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from builder.package.build_info import BUILD_INFO, BuildInfo
from builder.package.card import read_card_header
from builder.package.configs import CONFIGS, config_spec
from validation.schemas import SHOWN_COLUMNS, VALUE_SCHEMAS, Context, expected_features, key_column

EXAMPLES = 3
"""Offending rows quoted per failed check."""


@dataclass
class Check:
    """The outcome of one check."""

    name: str
    """`<area>: <rule>`."""
    ok: bool
    detail: str = ""
    """Why it failed (counts and example rows), empty when it passed."""


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


def resolve_dataset_dir(path: str | Path) -> Path:
    """A dataset folder, given it or the run directory that holds it as `dataset/`."""
    path = Path(path)
    if not (path / "README.md").exists() and (path / "dataset" / "README.md").exists():
        return path / "dataset"
    return path


class DatasetFolder:
    """Lazy, fresh reads of a dataset folder's configs and records."""

    def __init__(self, root: Path):
        self.root = root
        self._tables: dict[str, pa.Table] = {}

    def files(self, config: str) -> list[Path]:
        return sorted((self.root / config).glob("*.parquet"))

    def has(self, config: str) -> bool:
        return bool(self.files(config))

    def configs_on_disk(self) -> list[str]:
        return [p.name for p in sorted(self.root.iterdir()) if p.is_dir() and any(p.glob("*.parquet"))]

    def table(self, config: str) -> pa.Table:
        if config not in self._tables:
            self._tables[config] = pa.concat_tables([pq.read_table(f) for f in self.files(config)])
        return self._tables[config]

    @cached_property
    def recipe(self) -> dict[str, Any]:
        path = self.root / "recipe.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    @cached_property
    def build_info(self) -> BuildInfo | None:
        try:
            return BuildInfo.read(self.root)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def grid(self) -> tuple[int, int] | None:
        return self.build_info.grid if self.build_info else None

    @cached_property
    def context(self) -> Context:
        from builder.classify import CATEGORIES

        classify = self.recipe.get("classify", {})
        info = self.build_info
        sample_ids: frozenset[str] = frozenset()
        if self.has("samples"):
            sample_ids = frozenset(self.table("samples").column("sample_id").to_pylist())
        neuron_category: dict[str, str] = {}
        neurons = None
        if self.has("neurons"):
            neurons = self.table("neurons").select(["layer", "neuron", "category", "top_sample_ids"])
            frame = neurons.select(["layer", "neuron", "category"]).to_pandas()
            neuron_category = dict(zip(key_column(frame), frame["category"]))
        return Context(
            categories=CATEGORIES,
            confidence=classify.get("confidence"),
            tie_break=tuple(classify.get("tie_break", CATEGORIES)),
            top_n=classify.get("top_n"),
            layers=info.model.layers if info else None,
            neurons_per_layer=info.model.neurons_per_layer if info else None,
            grid=self.grid,
            sample_ids=sample_ids,
            neuron_category=neuron_category,
            neurons=neurons,
        )


CheckFn = Callable[[DatasetFolder], list[Check]]
CHECKS: list[CheckFn] = []


def check(fn: CheckFn) -> CheckFn:
    CHECKS.append(fn)
    return fn


def _outcome(name: str, problems: list[str]) -> Check:
    return Check(name, not problems, "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))


@check
def card_matches_files(ds: DatasetFolder) -> list[Check]:
    if not (ds.root / "README.md").exists():
        return [Check("card: README.md exists", False, f"no README.md in {ds.root}")]
    try:
        header = read_card_header(ds.root)
    except Exception as e:  # yaml errors of every kind
        return [Check("card: YAML header parses", False, str(e).splitlines()[0])]
    if not header:
        return [Check("card: YAML header parses", False, "README.md has no YAML header between --- lines")]
    out = []
    listed = []
    for cfg in header.get("configs", []):
        name = cfg.get("config_name", "?")
        listed.append(name)
        problems = [f"data_files path {df.get('path')!r} matches no file" for df in cfg.get("data_files", [])
                    if not glob.glob(str(ds.root / str(df.get("path", ""))))]
        if not cfg.get("data_files"):
            problems.append("no data_files")
        out.append(_outcome(f"card: config {name!r} names existing files", problems))
    unlisted = sorted(set(ds.configs_on_disk()) - set(listed))
    out.append(_outcome("card: every parquet folder is a card config",
                        [f"{c}/ is not in the card's configs" for c in unlisted]))
    defaults = [c.get("config_name") for c in header.get("configs", []) if c.get("default")]
    out.append(_outcome("card: the default config is neurons",
                        [] if defaults == ["neurons"] else [f"default configs: {defaults}"]))
    out.append(_outcome("card: dataset_info features match the configs' Features", _card_feature_problems(ds, header)))
    return out


def _card_feature_problems(ds: DatasetFolder, header: dict[str, Any]) -> list[str]:
    """The card's `dataset_info` must declare each config's Features (load_dataset trusts it)."""
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    infos = DatasetInfosDict.from_dataset_card_data(DatasetCardData(**header))
    problems = []
    for config in ds.configs_on_disk():
        expected = expected_features(config, ds.grid)
        info = infos.get(config)
        if expected is None:
            continue
        if info is None or info.features is None:
            problems.append(f"{config}: no dataset_info features")
        elif info.features != expected:
            problems.append(f"{config}: card features differ from the declared Features")
    return problems


@check
def build_info_recorded(ds: DatasetFolder) -> list[Check]:
    info = ds.build_info
    out = [Check("build_info: build_info.json is readable", info is not None,
                 "" if info else f"{BUILD_INFO} is missing or malformed; re-run the package stage")]
    if info is not None and ds.has("exemplars"):
        out.append(_outcome("build_info: the model's image grid is recorded",
                            [] if info.grid else ["model.image_grid is null but the dataset has exemplars"]))
    return out


@check
def files_match_build_info(ds: DatasetFolder) -> list[Check]:
    info = ds.build_info
    if info is None:
        return []
    out = []
    for config in sorted(set(ds.configs_on_disk()) | set(info.configs)):
        recorded = info.configs.get(config)
        on_disk = [f"{config}/{p.name}" for p in ds.files(config)]
        if recorded is None:
            out.append(Check(f"files: {config} is recorded in build_info.json", False, f"{config}/ is not recorded"))
            continue
        missing = sorted(set(recorded.files) - set(on_disk))
        extra = sorted(set(on_disk) - set(recorded.files))
        out.append(_outcome(f"files: {config} shards are the ones packaged",
                            [f"missing {missing}"] * bool(missing) + [f"stale or unknown {extra}"] * bool(extra)))
        if on_disk:
            rows = sum(pq.ParquetFile(ds.root / f).metadata.num_rows for f in on_disk)
            out.append(_outcome(f"files: {config} has the recorded {recorded.rows} rows",
                                [] if rows == recorded.rows else [f"files hold {rows} rows"]))
    return out


@check
def counts_match_manifest(ds: DatasetFolder) -> list[Check]:
    info = ds.build_info
    if info is None:
        return []
    out = []
    for spec in CONFIGS:
        if spec.manifest_count is None or spec.name not in info.configs:
            continue
        stage, key = spec.manifest_count
        expected = info.stage_counts.get(stage, {}).get(key)
        rows = info.configs[spec.name].rows
        out.append(_outcome(f"counts: {spec.name} rows == manifest {stage}.{key}",
                            [] if expected == rows else [f"{rows} rows, manifest says {expected}"]))
    classify = info.stage_counts.get("classify", {})
    if "neurons" in info.configs and classify and ds.has("neurons"):
        neurons = ds.table("neurons").select(["category", "high_confidence", "dead"]).to_pandas()
        actual = {**neurons["category"].value_counts().to_dict(),
                  "high_confidence": int(neurons["high_confidence"].sum()), "dead": int(neurons["dead"].sum())}
        problems = [f"{k}: {int(actual.get(k, 0))} in the data, manifest says {classify[k]}"
                    for k in (*ds.context.categories, "high_confidence", "dead")
                    if k in classify and int(actual.get(k, 0)) != classify[k]]
        out.append(_outcome("counts: neuron categories == manifest classify counts", problems))
    model = info.model
    if "neurons" in info.configs:
        want = model.layers * model.neurons_per_layer
        rows = info.configs["neurons"].rows
        out.append(_outcome(f"counts: neurons == {model.layers} layers x {model.neurons_per_layer}",
                            [] if rows == want else [f"{rows} neuron rows, expected {want}"]))
    if "layers" in info.configs:
        rows = info.configs["layers"].rows
        out.append(_outcome(f"counts: layers == {model.layers}",
                            [] if rows == model.layers else [f"{rows} layer rows"]))
    return out


@check
def schemas_match_features(ds: DatasetFolder) -> list[Check]:
    out = []
    for config in ds.configs_on_disk():
        if config_spec(config) is None:
            out.append(Check(f"schema: {config} is a known config", False,
                             f"{config}/ is not a config of this builder ({', '.join(c.name for c in CONFIGS)})"))
            continue
        if config == "exemplars" and ds.grid is None:
            continue  # reported by build_info_recorded: the expected heatmap shape is unknown
        expected = expected_features(config, ds.grid)
        problems = []
        for f in ds.files(config):
            problems += [f"{f.name}: {p}" for p in _schema_problems(pq.read_schema(f), expected)]
        out.append(_outcome(f"schema: {config} files have its declared Features", problems))
    return out


def _schema_problems(actual: pa.Schema, expected: Features) -> list[str]:
    want = expected.arrow_schema
    problems = []
    missing = [n for n in want.names if n not in actual.names]
    extra = [n for n in actual.names if n not in want.names]
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(f"undeclared columns {extra}")
    for name in want.names:
        if name in actual.names and not actual.field(name).type.equals(want.field(name).type):
            problems.append(f"{name}: {actual.field(name).type} != declared {want.field(name).type}")
    if not problems and actual.names != want.names:
        problems.append(f"column order {actual.names} != {want.names}")
    if not problems:
        try:
            recorded = Features.from_arrow_schema(actual)
        except Exception as e:  # malformed `huggingface` metadata
            recorded, problems = None, [f"unreadable Features metadata: {e}"]
        if recorded is not None and recorded != expected:
            problems.append("the file's Features metadata differs from the declared Features")
    return problems


@check
def values_satisfy_schemas(ds: DatasetFolder) -> list[Check]:
    out = []
    for config, (frame_fn, schema_fn, key) in VALUE_SCHEMAS.items():
        if not ds.has(config):
            continue
        if config == "exemplars" and ds.grid is None:
            continue
        try:
            frame = frame_fn(ds.table(config), ds.context)
        except Exception as e:  # e.g. shards with different schemas: reported, other configs still checked
            out.append(Check(f"{config}: values readable", False, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            continue
        out += pandera_checks(config, frame, schema_fn(ds.context), key)
    return out


def pandera_checks(config: str, frame: pd.DataFrame, schema: pdr.DataFrameSchema, key: list[str]) -> list[Check]:
    """One Check per rule of `schema`, failed rules quoting a few offending rows by key."""
    unique_label = f"({', '.join(schema.unique)}) unique" if schema.unique else None
    labels = []
    for column in schema.columns.values():
        labels += [c.error or c.name for c in column.checks]
    labels += [c.error or c.name for c in schema.checks]
    labels += [unique_label] if unique_label else []
    labels = list(dict.fromkeys(labels))
    try:
        schema.validate(frame, lazy=True)
        failures = pd.DataFrame(columns=["column", "check", "failure_case", "index"])
    except pdr.errors.SchemaErrors as e:
        failures = e.failure_cases
    failures = failures.assign(check=failures["check"].replace({"multiple_fields_uniqueness": unique_label}))
    out = []
    for label in labels + sorted(set(failures["check"].dropna()) - set(labels)):
        rows = failures[failures["check"] == label]
        detail = "" if rows.empty else _describe(rows, frame, key, SHOWN_COLUMNS.get(label))
        out.append(Check(f"{config}: {label}", rows.empty, detail))
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _describe(rows: pd.DataFrame, frame: pd.DataFrame, key: list[str], shown: list[str] | None) -> str:
    """'N rows, e.g. layer=0 neuron=7 (p_visual=1.5); ...' from pandera's failure cases."""
    index = [int(i) for i in rows["index"].dropna().unique()]
    if not index:
        return "; ".join(_fmt(c) for c in rows["failure_case"].head(EXAMPLES))
    examples = []
    for i in index[:EXAMPLES]:
        where = " ".join(f"{k}={frame.at[i, k]}" for k in key if k in frame.columns)
        values = rows[(rows["index"] == i) & rows["column"].notna() & ~rows["column"].isin(key)]
        if shown:
            values = values[values["column"].isin(shown)]
        quoted = ", ".join(f"{c}={_fmt(v)}" for c, v in zip(values["column"], values["failure_case"]))
        examples.append(where + (f" ({quoted})" if quoted else ""))
    return f"{len(index)} rows, e.g. " + "; ".join(examples)


@check
def layers_match_neurons(ds: DatasetFolder) -> list[Check]:
    if not (ds.has("layers") and ds.has("neurons")):
        return []
    layers = ds.table("layers").to_pandas().drop_duplicates("layer").set_index("layer")
    neurons = ds.table("neurons").select(["layer", "category", "high_confidence"]).to_pandas()
    counts = neurons.groupby(["layer", "category"]).size().unstack(fill_value=0)
    high = neurons[neurons["high_confidence"]].groupby(["layer", "category"]).size().unstack(fill_value=0)
    problems = []
    for layer, row in layers.iterrows():
        for c in ds.context.categories:
            for column, table in ((f"n_{c}", counts), (f"n_high_confidence_{c}", high)):
                expected = int(table.loc[layer, c]) if layer in table.index and c in table.columns else 0
                if int(row[column]) != expected:
                    problems.append(f"layer {layer} {column}={int(row[column])}, neurons say {expected}")
    if set(layers.index) != set(neurons["layer"].unique()):
        problems.append("the layers differ between the layers and neurons configs")
    return [_outcome("layers: counts match the neurons config", problems)]


def validate_dataset(path: str | Path) -> Report:
    """Run every check over the dataset folder at `path` (or `path/dataset`)."""
    root = resolve_dataset_dir(path)
    report = Report(str(root))
    if not root.is_dir():
        report.checks.append(Check("dataset folder exists", False, f"{root} is not a directory"))
        return report
    ds = DatasetFolder(root)
    for fn in CHECKS:
        try:
            report.checks.extend(fn(ds))
        except Exception as e:  # a check that cannot even read its input is a failure, not a crash
            report.checks.append(Check(fn.__name__, False, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
    return report
