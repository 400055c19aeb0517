"""`build-neuron-dataset validate`: the clean folder passes; each seeded defect makes it exit 1
and names the broken rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from builder.cli import app
from builder.package.features import exemplars_features

runner = CliRunner()
Rows = list[dict[str, Any]]


def rewrite(dataset: Path, config: str, edit: Callable[[Rows], Rows], schema: pa.Schema | None = None) -> None:
    """Edit a config's (single) shard row by row, keeping its schema and Features metadata."""
    (path,) = sorted((dataset / config).glob("*.parquet"))
    table = pq.read_table(path)
    pq.write_table(pa.Table.from_pylist(edit(table.to_pylist()), schema=schema or table.schema), path)


def row_where(rows: Rows, **match: Any) -> dict[str, Any]:
    return next(r for r in rows if all(r[k] == v for k, v in match.items()))


def duplicate_neuron(ds: Path) -> None:
    rewrite(ds, "neurons", lambda rows: rows + [rows[5]])


def fraction_out_of_range(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        rows[7]["p_visual"] = 1.5
        return rows

    rewrite(ds, "neurons", edit)


def fractions_not_summing_to_one(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        r = next(r for r in rows if r["p_unknown"] <= 0.5 and not r["dead"])
        r["p_unknown"] += 0.25
        return rows

    rewrite(ds, "neurons", edit)


def category_contradicting_fractions(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        r = row_where(rows, category="visual", p_text=0.0)
        r["category"] = "text"  # p_text is 0: the argmax says otherwise
        return rows

    rewrite(ds, "neurons", edit)


def wrong_heatmap_shape(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        for r in rows:
            r["heatmap"] = [line[:5] for line in r["heatmap"][:5]]
        return rows

    rewrite(ds, "exemplars", edit, schema=exemplars_features((5, 5)).arrow_schema)


def dangling_exemplar(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        rows[0] = {**rows[0], "neuron": 9999}
        rows[1] = {**rows[1], "sample_id": "no-such-sample"}
        return rows

    rewrite(ds, "exemplars", edit)


def card_config_naming_a_missing_file(ds: Path) -> None:
    readme = ds / "README.md"
    text = readme.read_text()
    ghost = "- config_name: ghost\n  data_files:\n  - split: train\n    path: ghost/train-*.parquet\n"
    readme.write_text(text.replace("configs:\n", "configs:\n" + ghost, 1))


def score_out_of_range(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        next(r for r in rows if r["score"] is not None)["score"] = 1.7
        return rows

    rewrite(ds, "explanations", edit)


def failure_stored_as_explanation(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        r = row_where(rows, status="failed")
        r["status"], r["explanation"] = "ok", "Explanation could not be parsed."
        return rows

    rewrite(ds, "explanations", edit)


def heatmap_off_scale(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        rows[3]["heatmap"][2][2] = 11.0
        return rows

    rewrite(ds, "exemplars", edit)


def stale_shard(ds: Path) -> None:
    (path,) = sorted((ds / "neurons").glob("*.parquet"))
    (ds / "neurons" / "train-00000-of-00002.parquet").write_bytes(path.read_bytes())


def counts_disagree_with_manifest(ds: Path) -> None:
    info = json.loads((ds / "build_info.json").read_text())
    info["stage_counts"]["corpus"]["samples"] += 1
    (ds / "build_info.json").write_text(json.dumps(info))


def high_confidence_ignores_threshold(ds: Path) -> None:
    def edit(rows: Rows) -> Rows:
        r = next(r for r in rows if not r["high_confidence"] and r["confidence"] < 0.8)
        r["high_confidence"] = True
        return rows

    rewrite(ds, "neurons", edit)


DEFECTS = [
    (duplicate_neuron, "neurons: (layer, neuron) unique"),
    (fraction_out_of_range, "neurons: p_visual in [0, 1]"),
    (fractions_not_summing_to_one, "neurons: fractions sum to 1"),
    (category_contradicting_fractions, "neurons: category is the argmax of the fractions"),
    (wrong_heatmap_shape, "exemplars: heatmap shape is the model grid 6x6"),
    (dangling_exemplar, "exemplars: (layer, neuron) names an existing neuron"),
    (dangling_exemplar, "exemplars: sample_id names an existing sample"),
    (card_config_naming_a_missing_file, "card: config 'ghost' names existing files"),
    (score_out_of_range, "explanations: score in [-1, 1]"),
    (failure_stored_as_explanation, "explanations: ok rows have an explanation and no failure"),
    (heatmap_off_scale, "exemplars: heatmap in [0, 10]"),
    (stale_shard, "files: neurons shards are the ones packaged"),
    (counts_disagree_with_manifest, "counts: samples rows == manifest corpus.samples"),
    (high_confidence_ignores_threshold, "neurons: high_confidence == (confidence > 0.8)"),
]


def test_clean_folder_passes(dataset: Path) -> None:
    result = runner.invoke(app, ["validate", str(dataset)])
    assert result.exit_code == 0, result.output
    assert " 0 failed" in result.output and "FAIL" not in result.output
    assert "exemplars: heatmap shape is the model grid 6x6" in result.output  # every config was checked
    assert "explanations: score in [-1, 1]" in result.output
    assert runner.invoke(app, ["validate", str(dataset.parent)]).exit_code == 0  # a run directory works too


@pytest.mark.parametrize("defect, check", DEFECTS, ids=[f"{d.__name__}-{i}" for i, (d, _) in enumerate(DEFECTS)])
def test_seeded_defect_fails_and_is_named(dataset: Path, defect: Callable[[Path], None], check: str) -> None:
    defect(dataset)
    result = runner.invoke(app, ["validate", str(dataset)])
    assert result.exit_code == 1, result.output
    failed = [line.strip() for line in result.output.splitlines() if line.strip().startswith("FAIL")]
    assert any(line.startswith(f"FAIL  {check}") for line in failed), "\n".join(failed)


def test_wrong_heatmap_shape_also_fails_the_schema(dataset: Path) -> None:
    wrong_heatmap_shape(dataset)
    result = runner.invoke(app, ["validate", str(dataset)])
    line = next(l for l in result.output.splitlines() if "schema: exemplars" in l)
    assert line.strip().startswith("FAIL") and "heatmap" in line and "[5]" in line


def test_failure_detail_quotes_the_offending_row(dataset: Path) -> None:
    fraction_out_of_range(dataset)
    result = runner.invoke(app, ["validate", str(dataset)])
    line = next(l for l in result.output.splitlines() if "p_visual in [0, 1]" in l)
    assert "1 rows, e.g. layer=0 neuron=7 (p_visual=1.5)" in line


def test_missing_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "is not a directory" in result.output
