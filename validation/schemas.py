"""What a valid config looks like: arrow schemas for the types, pandera schemas for the values.

Types come straight from the package's `datasets.Features` (one declaration, shared with
packaging). Values and invariants are pandera `DataFrameSchema`s over a *check frame*: the
config's scalar columns plus a few columns derived from its list columns (lengths, minima,
maxima, unknown references), so list-valued data is checked with the same library.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc
from datasets import Features

from builder.package import features as F
from builder.package.configs import config_spec

SUM_TOLERANCE = 1e-5
FRACTION_COLUMNS = ["p_visual", "p_text", "p_multimodal", "p_unknown"]


def expected_features(config: str, grid: tuple[int, int] | None) -> Features | None:
    """The Features a config's files must carry (None for an unknown config)."""
    spec = config_spec(config)
    return spec.features(grid) if spec else None


@dataclass(frozen=True)
class Context:
    """What the value checks need to know beyond one config's own rows."""

    categories: tuple[str, ...]
    confidence: float | None
    """classify.confidence from recipe.json (None: not recorded)."""
    tie_break: tuple[str, ...]
    top_n: int | None
    layers: int | None
    neurons_per_layer: int | None
    grid: tuple[int, int] | None
    sample_ids: frozenset[str]
    neuron_category: dict[str, str]
    """'layer:neuron' -> category, for every published neuron."""
    neurons: pa_arrow.Table | None
    """layer, neuron, category and top_sample_ids of every published neuron."""


SHOWN_COLUMNS: dict[str, list[str]] = {}
"""Rule label -> the columns a report quotes for an offending row (default: all)."""


def rule(label: str, fn, show: list[str] | None = None) -> pa.Check:
    """A pandera check whose failure cases carry `label` (the report's name for it)."""
    if show:
        SHOWN_COLUMNS[label] = show
    return pa.Check(fn, name=label, error=label)


def key_column(frame: pd.DataFrame) -> pd.Series:
    return frame["layer"].astype(str) + ":" + frame["neuron"].astype(str)


# ----------------------------------------------------------------------------- list columns


def _per_row(values: pa_arrow.Array, parents: np.ndarray, n: int, how: str) -> np.ndarray:
    """Per-row min/max/sum of `values` grouped by row index `parents` (empty rows: NaN, sum 0)."""
    out = np.full(n, 0.0 if how in ("sum", "count") else np.nan)
    if len(values) == 0:
        return out
    t = pa_arrow.table({"row": parents, "v": values})
    agg = t.group_by("row").aggregate([("v", how)])
    out[agg["row"].to_numpy()] = agg[f"v_{how}"].to_numpy(zero_copy_only=False).astype(float)
    return out


def list_stats(column: pa_arrow.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(length, min, max) of each row of a list-of-numbers column."""
    col = column.combine_chunks()
    n = len(col)
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(col)
    parents = pc.list_parent_indices(col).to_numpy()
    return lengths, _per_row(values, parents, n, "min"), _per_row(values, parents, n, "max")


def grid_stats(column: pa_arrow.ChunkedArray) -> dict[str, np.ndarray]:
    """Shape and value range of each row of a list-of-lists column (heatmaps)."""
    col = column.combine_chunks()
    n = len(col)
    rows_of = pc.list_parent_indices(col).to_numpy()
    inner = pc.list_flatten(col)
    widths = pc.list_value_length(inner).fill_null(0)
    values = pc.list_flatten(inner)
    value_rows = rows_of[pc.list_parent_indices(inner).to_numpy()] if len(values) else np.zeros(0, np.int64)
    return {
        "heatmap_rows": pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(float),
        "heatmap_min_width": _per_row(widths, rows_of, n, "min"),
        "heatmap_max_width": _per_row(widths, rows_of, n, "max"),
        "heatmap_min": _per_row(values, value_rows, n, "min"),
        "heatmap_max": _per_row(values, value_rows, n, "max"),
    }


def unknown_count(column: pa_arrow.ChunkedArray, known: frozenset[str]) -> np.ndarray:
    """Per row: how many of a list-of-strings column's values are not in `known`."""
    col = column.combine_chunks()
    values = pc.list_flatten(col)
    missing = pc.invert(pc.is_in(values, value_set=pa_arrow.array(sorted(known), pa_arrow.string())))
    parents = pc.list_parent_indices(col).to_numpy()
    return _per_row(pc.cast(missing, pa_arrow.int64()), parents, len(col), "sum")


# ----------------------------------------------------------------------------- neurons


def neurons_frame(table: pa_arrow.Table, ctx: Context) -> pd.DataFrame:
    frame = table.drop_columns(["top_sample_ids"]).to_pandas()
    top = table["top_sample_ids"]
    frame["n_top_sample_ids"] = pc.list_value_length(top.combine_chunks()).fill_null(0).to_numpy(zero_copy_only=False)
    frame["unknown_top_samples"] = unknown_count(top, ctx.sample_ids)
    return frame


def expected_category(frame: pd.DataFrame, categories: tuple[str, ...], tie_break: tuple[str, ...]) -> pd.Series:
    """Argmax of the fractions, ties broken by the recipe's order (the classify stage's rule)."""
    order = list(tie_break) or list(categories)
    fractions = frame[[f"p_{c}" for c in order]].to_numpy()
    return pd.Series(np.asarray(order, dtype=object)[fractions.argmax(axis=1)], index=frame.index)


def category_fraction(frame: pd.DataFrame, categories: tuple[str, ...]) -> pd.Series:
    """Each row's fraction of its own category (NaN for an unknown category)."""
    fractions = frame[[f"p_{c}" for c in categories]].to_numpy(dtype=float)
    index = frame["category"].map({c: i for i, c in enumerate(categories)})
    known = index.notna().to_numpy()
    out = np.full(len(frame), np.nan)
    out[known] = fractions[np.flatnonzero(known), index[known].astype(int).to_numpy()]
    return pd.Series(out, index=frame.index)


def in_top_samples(exemplars: pa_arrow.Table, neurons: pa_arrow.Table | None) -> np.ndarray:
    """Per exemplar row: its sample is among its neuron's top samples."""
    def joined(*parts) -> pa_arrow.Array:
        return pc.binary_join_element_wise(*(pc.cast(p, pa_arrow.string()) for p in parts), "|")

    wanted = joined(exemplars["layer"], exemplars["neuron"], exemplars["sample_id"])
    if neurons is None:
        return np.zeros(len(wanted), dtype=bool)
    # only the exemplars' neurons: a few thousand of the model's hundreds of thousands
    mine = neurons.filter(pc.is_in(joined(neurons["layer"], neurons["neuron"]),
                                   value_set=joined(exemplars["layer"], exemplars["neuron"])))
    top = mine["top_sample_ids"].combine_chunks()
    parents = pc.list_parent_indices(top)
    known = joined(pc.take(mine["layer"], parents), pc.take(mine["neuron"], parents), pc.list_flatten(top))
    return pc.is_in(wanted, value_set=known).to_numpy(zero_copy_only=False)


def neurons_schema(ctx: Context) -> pa.DataFrameSchema:
    fraction = {c: pa.Column(None, pa.Check.in_range(0, 1, error=f"{c} in [0, 1]")) for c in FRACTION_COLUMNS}
    layer_range = [pa.Check.in_range(0, ctx.layers - 1, error=f"layer in [0, {ctx.layers - 1}]")] if ctx.layers else []
    neuron_range = ([pa.Check.in_range(0, ctx.neurons_per_layer - 1, error=f"neuron in [0, {ctx.neurons_per_layer - 1}]")]
                    if ctx.neurons_per_layer else [])
    checks = [
        rule("fractions sum to 1", lambda df: (df[FRACTION_COLUMNS].sum(axis=1) - 1).abs() <= SUM_TOLERANCE,
             show=FRACTION_COLUMNS),
        rule(f"category is the argmax of the fractions (ties: {' > '.join(ctx.tie_break)})",
             lambda df: df["category"] == expected_category(df, ctx.categories, ctx.tie_break),
             show=["category", *FRACTION_COLUMNS]),
        rule("confidence is the category's fraction",
             lambda df: (df["confidence"] - category_fraction(df, ctx.categories)).abs() <= SUM_TOLERANCE, show=["category", "confidence", *FRACTION_COLUMNS]),
        rule("fractions are counts out of n_top",
             lambda df: ((df[FRACTION_COLUMNS].mul(df["n_top"].clip(lower=1), axis=0)
                          - df[FRACTION_COLUMNS].mul(df["n_top"].clip(lower=1), axis=0).round()).abs() < 1e-3).all(axis=1),
             show=["n_top", *FRACTION_COLUMNS]),
        rule("top_sample_ids has n_top entries", lambda df: df["n_top_sample_ids"] == df["n_top"],
             show=["n_top", "n_top_sample_ids"]),
        rule("dead neurons are unknown", lambda df: ~df["dead"] | (df["category"] == "unknown"),
             show=["dead", "category"]),
    ]
    if ctx.confidence is not None:
        checks.append(rule(f"high_confidence == (confidence > {ctx.confidence})",
                           lambda df: df["high_confidence"] == (df["confidence"] > ctx.confidence),
                           show=["confidence", "high_confidence"]))
    return pa.DataFrameSchema(
        {
            "layer": pa.Column(None, layer_range),
            "neuron": pa.Column(None, neuron_range),
            "category": pa.Column(None, pa.Check.isin(list(ctx.categories), error="category is a known category")),
            **fraction,
            "confidence": pa.Column(None, pa.Check.in_range(0, 1, error="confidence in [0, 1]")),
            "max_activation": pa.Column(None, rule("max_activation is finite", np.isfinite)),
            "n_top": pa.Column(None, pa.Check.in_range(0, ctx.top_n or 2**31, error=f"n_top in [0, {ctx.top_n}]")),
            "unknown_top_samples": pa.Column(None, pa.Check.eq(0, error="top_sample_ids name existing samples")),
            # Significance columns: null when the test was not run.
            "p_value_visual_vs_text": pa.Column(
                None, pa.Check.in_range(0, 1, error="p_value_visual_vs_text in [0, 1]"), nullable=True),
            "p_value_category": pa.Column(None, pa.Check.in_range(0, 1, error="p_value_category in [0, 1]"),
                                          nullable=True),
            "visual_minus_text": pa.Column(
                None, pa.Check.in_range(-10, 10, error="visual_minus_text in [-10, 10]"), nullable=True),
        },
        checks=checks,
        unique=["layer", "neuron"],
        report_duplicates="all",
    )


# ----------------------------------------------------------------------------- layers, samples


def layers_schema(ctx: Context) -> pa.DataFrameSchema:
    cats = ctx.categories
    columns = {"layer": pa.Column(None, pa.Check.ge(0, error="layer >= 0")),
               "neurons": pa.Column(None, pa.Check.ge(0, error="neurons >= 0"))}
    for c in cats:
        columns[f"frac_{c}"] = pa.Column(None, pa.Check.in_range(0, 1, error=f"frac_{c} in [0, 1]"))
    return pa.DataFrameSchema(
        columns,
        checks=[
            rule("category counts sum to neurons",
                 lambda df: df[[f"n_{c}" for c in cats]].sum(axis=1) == df["neurons"],
                 show=["neurons", *[f"n_{c}" for c in cats]]),
            rule("frac_* == n_* / neurons",
                 lambda df: pd.concat([(df[f"frac_{c}"] - df[f"n_{c}"] / df["neurons"].clip(lower=1)).abs() < 1e-6
                                       for c in cats], axis=1).all(axis=1),
                 show=["neurons", *[f"n_{c}" for c in cats], *[f"frac_{c}" for c in cats]]),
            rule("high-confidence counts <= category counts",
                 lambda df: pd.concat([df[f"n_high_confidence_{c}"] <= df[f"n_{c}"] for c in cats], axis=1).all(axis=1),
                 show=[f"n_{c}" for c in cats] + [f"n_high_confidence_{c}" for c in cats]),
            rule("n_high_confidence is the sum over categories",
                 lambda df: df[[f"n_high_confidence_{c}" for c in cats]].sum(axis=1) == df["n_high_confidence"],
                 show=["n_high_confidence", *[f"n_high_confidence_{c}" for c in cats]]),
        ],
        unique=["layer"],
        report_duplicates="all",
    )


def samples_schema(ctx: Context) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "sample_id": pa.Column(),
            "text": pa.Column(None, pa.Check.str_length(min_value=1, error="text is not empty")),
            "text_source": pa.Column(None, pa.Check.isin(["caption", "generate"], error="text_source is caption or generate")),
        },
        unique=["sample_id"],
        report_duplicates="all",
    )


# ----------------------------------------------------------------------------- exemplars


def _image_ok(table: pa_arrow.Table) -> np.ndarray:
    """Per row: the embedded image bytes open as an image (header check, no full decode)."""
    import io

    from PIL import Image

    ok = []
    for data in table["image"].combine_chunks().field("bytes").to_pylist():
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            ok.append(True)
        except Exception:  # any unreadable image is a failed row, reported with its key
            ok.append(False)
    return np.asarray(ok)


def exemplars_frame(table: pa_arrow.Table, ctx: Context) -> pd.DataFrame:
    frame = table.select(["layer", "neuron", "rank", "sample_id", "role"]).to_pandas()
    for name, values in grid_stats(table["heatmap"]).items():
        frame[name] = values
    frame["n_tokens"] = pc.list_value_length(table["tokens"].combine_chunks()).fill_null(0).to_numpy(zero_copy_only=False)
    n, lo, hi = list_stats(table["token_activations"])
    frame["n_token_activations"], frame["token_min"], frame["token_max"] = n, lo, hi
    frame["image_ok"] = _image_ok(table)
    frame["in_top"] = in_top_samples(table, ctx.neurons)
    frame["neuron_key"] = key_column(frame)
    return frame


def heatmap_shape(grid: tuple[int, int] | None) -> dict[str, pa.Column]:
    """Heatmap rows and row widths equal to the model's grid (checked elsewhere when unknown)."""
    if grid is None:
        return {}
    h, w = grid
    label = f"heatmap shape is the model grid {h}x{w}"
    return {c: pa.Column(None, pa.Check.eq(v, error=label))
            for c, v in (("heatmap_rows", h), ("heatmap_min_width", w), ("heatmap_max_width", w))}


def exemplars_schema(ctx: Context) -> pa.DataFrameSchema:
    in_scale = lambda col: pa.Column(None, pa.Check.in_range(0, 10, error=f"{col} in [0, 10]"), nullable=True)  # noqa: E731
    return pa.DataFrameSchema(
        {
            "neuron_key": pa.Column(None, pa.Check.isin(list(ctx.neuron_category),
                                                        error="(layer, neuron) names an existing neuron")),
            "sample_id": pa.Column(None, pa.Check.isin(sorted(ctx.sample_ids), error="sample_id names an existing sample")),
            "rank": pa.Column(None, pa.Check.ge(0, error="rank >= 0")),
            "role": pa.Column(None, pa.Check.isin(list(F.EXEMPLAR_ROLES), error=f"role in {list(F.EXEMPLAR_ROLES)}")),
            **heatmap_shape(ctx.grid),
            "heatmap_min": in_scale("heatmap"),
            "heatmap_max": in_scale("heatmap"),
            "token_min": in_scale("token_activations"),
            "token_max": in_scale("token_activations"),
            "image_ok": pa.Column(None, pa.Check.eq(True, error="image is a readable embedded image")),
            "in_top": pa.Column(None, pa.Check.eq(True, error="sample is among its neuron's top samples")),
        },
        checks=[rule("one activation per token", lambda df: df["n_tokens"] == df["n_token_activations"],
                     show=["n_tokens", "n_token_activations"])],
        unique=["layer", "neuron", "rank"],
        report_duplicates="all",
    )


# ----------------------------------------------------------------------------- explanations


def explanations_frame(table: pa_arrow.Table, ctx: Context) -> pd.DataFrame:
    frame = table.drop_columns(["per_sample_scores"]).to_pandas()
    scores = table["per_sample_scores"].combine_chunks()
    inner = pc.list_flatten(scores)
    parents = pc.list_parent_indices(scores).to_numpy()
    n = len(scores)
    frame["per_sample_min"] = _per_row(inner.field("score"), parents, n, "min")
    frame["per_sample_max"] = _per_row(inner.field("score"), parents, n, "max")
    ids = inner.field("sample_id")
    unknown = pc.invert(pc.is_in(ids, value_set=pa_arrow.array(sorted(ctx.sample_ids), pa_arrow.string())))
    frame["per_sample_unknown"] = _per_row(pc.cast(unknown, pa_arrow.int64()), parents, n, "sum")
    bad = pc.or_(pc.invert(pc.is_in(inner.field("modality"), value_set=pa_arrow.array(list(F.SCORE_MODALITIES)))),
                 pc.invert(pc.is_in(inner.field("role"), value_set=pa_arrow.array(list(F.SCORED_SAMPLE_ROLES)))))
    frame["per_sample_bad_labels"] = _per_row(pc.cast(bad, pa_arrow.int64()), parents, n, "sum")
    keys = key_column(frame)
    frame["neuron_key"] = keys
    frame["neuron_category"] = keys.map(ctx.neuron_category)
    return frame


def explanations_schema(ctx: Context) -> pa.DataFrameSchema:
    def score(col: str) -> pa.Column:
        return pa.Column(None, pa.Check.in_range(-1, 1, error=f"{col} in [-1, 1]"), nullable=True)

    filled = lambda s: s.notna() & (s.astype("string").str.strip().str.len() > 0)  # noqa: E731
    return pa.DataFrameSchema(
        {
            "neuron_key": pa.Column(None, pa.Check.isin(list(ctx.neuron_category),
                                                        error="(layer, neuron) names an existing neuron")),
            "status": pa.Column(None, pa.Check.isin(list(F.EXPLANATION_STATUSES),
                                                   error=f"status in {list(F.EXPLANATION_STATUSES)}")),
            **{c: score(c) for c in ("score", "visual_score", "text_score", "baseline_score",
                                     "per_sample_min", "per_sample_max")},
            "per_sample_unknown": pa.Column(None, pa.Check.eq(0, error="per_sample_scores name existing samples")),
            "per_sample_bad_labels": pa.Column(None, pa.Check.eq(
                0, error=f"per_sample_scores modality in {list(F.SCORE_MODALITIES)} and role in {list(F.SCORED_SAMPLE_ROLES)}")),
        },
        checks=[
            rule("category is the neuron's category", lambda df: df["category"] == df["neuron_category"],
                 show=["category", "neuron_category"]),
            rule("ok rows have an explanation and no failure",
                 lambda df: (df["status"] != "ok") | (filled(df["explanation"]) & ~filled(df["failure"])),
                 show=["status", "explanation", "failure"]),
            rule("failed rows have a failure and no explanation",
                 lambda df: (df["status"] != "failed") | (filled(df["failure"]) & ~filled(df["explanation"])),
                 show=["status", "explanation", "failure"]),
            rule("scored rows name their simulator", lambda df: df["score"].isna() | filled(df["simulator"]),
                 show=["score", "simulator"]),
            rule("a score exists exactly when score_status is ok",
                 lambda df: df["score"].notna() == (df["score_status"] == "ok"),
                 show=["score", "score_status"]),
            rule("failed scores name their failure",
                 lambda df: (df["score_status"] != "failed") | filled(df["score_failure"]),
                 show=["score_status", "score_failure"]),
        ],
        unique=["layer", "neuron"],
        report_duplicates="all",
    )


VALUE_SCHEMAS = {
    "neurons": (neurons_frame, neurons_schema, ["layer", "neuron"]),
    "layers": (lambda t, ctx: t.to_pandas(), layers_schema, ["layer"]),
    "samples": (lambda t, ctx: t.to_pandas(), samples_schema, ["sample_id"]),
    "exemplars": (exemplars_frame, exemplars_schema, ["layer", "neuron", "rank"]),
    "explanations": (explanations_frame, explanations_schema, ["layer", "neuron"]),
}
"""Per config: (check-frame builder, pandera schema builder, key columns named in reports)."""
