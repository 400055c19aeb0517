"""The package stage: every config loads with its declared Features (eagerly and streaming),
the layout suits the Hub viewer, the output is byte-identical for the same inputs, and bad
source tables are refused at write time."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from builder.errors import StageError
from builder.package.configs import CONFIGS, config_spec
from validation import validate_dataset

ALL_CONFIGS = [c.name for c in CONFIGS]


def _digests(dataset: Path, pattern: str = "*.parquet") -> dict[str, str]:
    return {p.relative_to(dataset).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dataset.rglob(pattern)) if p.is_file()}


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_config_loads_with_its_features(full_run: Path, config: str) -> None:
    from datasets import load_dataset

    dataset = full_run / "dataset"
    info = json.loads((dataset / "build_info.json").read_text())
    expected = config_spec(config).features(tuple(info["model"]["image_grid"]))
    ds = load_dataset(str(dataset), config, split="train", download_mode="force_redownload")
    assert ds.features == expected
    assert ds.num_rows == info["configs"][config]["rows"] > 0
    keys = list(config_spec(config).sort_by)
    order = [tuple(r[k] for k in keys) for r in ds.select_columns(keys)]
    assert order == sorted(order) and len(set(order)) == len(order)  # stable, unique row order

    streamed = load_dataset(str(dataset), config, split="train", streaming=True)
    assert streamed.features == expected
    first = next(iter(streamed))
    assert set(first) == set(expected)
    if config == "exemplars":
        assert isinstance(first["image"], Image.Image) and isinstance(ds[0]["image"], Image.Image)
        assert np.asarray(first["heatmap"]).shape == (6, 6)
        assert len(first["tokens"]) == len(first["token_activations"]) > 0


def test_tiny_counts_and_contents(full_run: Path, tools) -> None:
    dataset = full_run / "dataset"
    neurons = pq.read_table(dataset / "neurons").to_pylist()
    assert len(neurons) == 4 * 96
    assert [(r["layer"], r["neuron"]) for r in neurons] == [(l, n) for l in range(4) for n in range(96)]
    exemplars = pq.read_table(dataset / "exemplars")
    assert exemplars.num_rows == len(tools.explained_neurons(full_run)) * tools.exemplars_per_neuron
    # the source's images and heatmaps arrive unchanged, only reordered
    source = tools.exemplars_table(full_run).sort_by([("layer", "ascending"), ("neuron", "ascending"), ("rank", "ascending")])
    assert exemplars.column("image").combine_chunks().field("bytes").to_pylist() == source.column("image").to_pylist()
    np.testing.assert_allclose(np.asarray(exemplars.column("heatmap").to_pylist(), dtype=np.float32),
                               np.asarray(source.column("heatmap").to_pylist(), dtype=np.float32))
    explanations = pq.read_table(dataset / "explanations").to_pylist()
    failed = [r for r in explanations if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["explanation"] is None and failed[0]["failure"].startswith("refusal")
    assert validate_dataset(dataset).ok, validate_dataset(dataset).render()


def test_same_run_packages_to_byte_identical_parquet(full_run: Path, tmp_path: Path, tools) -> None:
    first = _digests(full_run / "dataset")
    again = tools.package(tools.copy_run(full_run, tmp_path / "elsewhere"))  # another folder, same inputs
    assert _digests(again) == first
    assert len(first) == len(ALL_CONFIGS)
    # the card, build_info.json, recipe.json and plots too: re-publishing a re-packaged run sends nothing
    assert _digests(again, "*") == _digests(full_run / "dataset", "*")


def test_shards_rotate_by_size_and_row_groups_stay_small(full_run: Path, tmp_path: Path, tools) -> None:
    run = tools.copy_run(full_run, tmp_path / "run")
    dataset = tools.package(run, max_shard_mb=0.05, row_group_mb=0.01, image_rows_per_group=3)
    neuron_files = sorted((dataset / "neurons").glob("*.parquet"))
    assert len(neuron_files) > 1
    assert [p.name for p in neuron_files] == [f"train-{i:05d}-of-{len(neuron_files):05d}.parquet"
                                              for i in range(len(neuron_files))]
    for config in ("neurons", "exemplars"):
        for path in sorted((dataset / config).glob("*.parquet")):
            meta = pq.ParquetFile(path).metadata
            groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
            assert all(g.column(0).has_offset_index and g.column(0).has_column_index for g in groups)
            if config == "exemplars":
                assert max(g.num_rows for g in groups) <= 3
            else:
                assert max(g.total_byte_size for g in groups) <= 40_000  # ~0.01 MB uncompressed each
    # same rows, same order as the single-shard layout
    assert pq.read_table(dataset / "neurons").equals(pq.read_table(full_run / "dataset" / "neurons"))
    report = validate_dataset(dataset)
    assert report.ok, report.render()
    from datasets import load_dataset

    loaded = load_dataset(str(dataset), "neurons", split="train", download_mode="force_redownload")
    assert loaded.num_rows == 384 and loaded[383]["layer"] == 3


def test_wrong_heatmap_shape_is_refused_when_packaging(full_run: Path, tmp_path: Path, tools) -> None:
    run = tools.copy_run(full_run, tmp_path / "run")
    pq.write_table(tools.exemplars_table(run, grid=(6, 5)), run / "exemplars.parquet")
    with pytest.raises(StageError, match=r"exemplars.parquet: column 'heatmap' does not fit .*list\[list\[float32; 6\]; 6\]"):
        tools.package(run)
    assert _digests(run / "dataset") == _digests(full_run / "dataset")  # the old dataset folder is intact


def test_undeclared_and_missing_columns_are_refused(full_run: Path, tmp_path: Path, tools) -> None:
    run = tools.copy_run(full_run, tmp_path / "run")
    neurons = pq.read_table(run / "neurons.parquet")
    pq.write_table(neurons.append_column("p_value", pa.array(np.zeros(neurons.num_rows))), run / "neurons.parquet")
    with pytest.raises(StageError, match=r"columns \['p_value'\] are not declared for the 'neurons' config"):
        tools.package(run)
    pq.write_table(neurons.drop_columns(["confidence"]), run / "neurons.parquet")
    with pytest.raises(StageError, match=r"columns \['confidence'\] of the 'neurons' config are missing"):
        tools.package(run)
    pq.write_table(neurons, run / "neurons.parquet")
    explanations = pq.read_table(run / "explanations.parquet")  # scores belong in scores.parquet
    pq.write_table(explanations.append_column("score", pa.nulls(explanations.num_rows, pa.float32())),
                   run / "explanations.parquet")
    with pytest.raises(StageError, match=r"columns \['score'\] appear twice in the 'explanations' config"):
        tools.package(run)


def test_optional_configs_follow_their_sources(tiny_run: Path, tmp_path: Path, tools) -> None:
    run = tools.copy_run(tiny_run, tmp_path / "run")
    for source in ("exemplars.parquet", "explanations.parquet", "scores.parquet"):  # as before those stages ran
        (run / source).unlink(missing_ok=True)
    dataset = tools.package(run)
    assert sorted(p.name for p in dataset.iterdir() if p.is_dir()) == ["layers", "neurons", "plots", "samples"]
    tools.add_explained(run, scored=False)  # explained, not yet simulated: score columns are null
    dataset = tools.package(run)
    assert {"exemplars", "explanations"} <= {p.name for p in dataset.iterdir()}
    explanations = pq.read_table(dataset / "explanations")
    assert explanations.column("score").null_count == explanations.num_rows
    assert explanations.column("per_sample_scores").null_count == explanations.num_rows
    report = validate_dataset(dataset)
    assert report.ok, report.render()
    (run / "exemplars.parquet").unlink()
    (run / "explanations.parquet").unlink()
    dataset = tools.package(run)
    assert not (dataset / "exemplars").exists()  # a config whose source is gone leaves the folder
    assert validate_dataset(dataset).ok


def test_card(full_run: Path, tmp_path: Path, tools) -> None:
    dataset = full_run / "dataset"
    text = (dataset / "README.md").read_text()
    header = yaml.safe_load(text.split("---", 2)[1])
    assert header["license"] == "mit"
    assert header["task_categories"] == ["image-text-to-text"] and "interpretability" in header["tags"]
    assert header["size_categories"] == ["n<1K"]
    assert [c["config_name"] for c in header["configs"]] == ALL_CONFIGS
    assert [c["config_name"] for c in header["configs"] if c.get("default")] == ["neurons"]
    assert sorted(i["config_name"] for i in header["dataset_info"]) == sorted(ALL_CONFIGS)
    for config in ALL_CONFIGS:
        assert f'load_dataset("ORG/NAME", "{config}", split="train", revision="v0.1.0")' in text
    info = json.loads((dataset / "build_info.json").read_text())
    assert len(info["plots"]) >= 3
    for plot in info["plots"]:
        assert (dataset / plot["path"]).is_file() and f"]({plot['path']})" in text
    explanations = pq.read_table(dataset / "explanations").to_pylist()
    best = max((r for r in explanations if r["score"] is not None), key=lambda r: r["score"])
    assert f"| {best['layer']} | {best['neuron']} | {best['category']} |" in text and best["explanation"] in text
    # Each example neuron shows what its explainer was shown: its shown exemplars' images as a
    # strip (visual, multimodal), the tokens of its top activations (text, multimodal).
    rows = [line for line in text.splitlines() if re.match(r"^\| \d+ \| \d+ \| (visual|text|multimodal) \|", line)]
    assert rows
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        layer, neuron, category, strip, tokens = cells[0], cells[1], cells[2], cells[4], cells[5]
        if category in ("visual", "multimodal"):
            path = f"plots/examples/L{layer}-N{neuron}.png"
            assert f"]({path})" in strip and (dataset / path).is_file()
            shown = [r for r in pq.read_table(dataset / "exemplars").to_pylist()
                     if (r["layer"], r["neuron"], r["role"]) == (int(layer), int(neuron), "shown")]
            with Image.open(dataset / path) as strip_image:
                assert strip_image.size == (min(len(shown), 4) * 164 - 4, 160)
        else:
            assert strip == ""
        if category == "text":
            assert tokens.startswith("'")
        elif category == "visual":
            assert tokens == ""
    assert "## Explanation scores" in text and "Skipped samples by reason: none." in text
    assert "**4** visual tokens with normalised activation > **2.0**" in text
    assert "archivePrefix = {arXiv}" in text and "Version 0.1.0" in text

    run = tools.copy_run(full_run, tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["recipe"]["model"]["license"] = "llama2"
    manifest["recipe"]["corpus"]["license"] = "cc-by-4.0"
    manifest["recipe"]["publish"]["repo"] = "org/tiny-neurons"
    (run / "manifest.json").write_text(json.dumps(manifest))
    text = (tools.package(run) / "README.md").read_text()
    header = yaml.safe_load(text.split("---", 2)[1])
    assert header["license"] == "other" and header["license_name"] == "llama2-and-cc-by-4.0"
    assert "`llama2`" in text and "`cc-by-4.0`" in text and 'load_dataset("org/tiny-neurons", "neurons"' in text


def test_missing_required_source_names_the_stage(tiny_run: Path, tmp_path: Path, tools) -> None:
    run = tools.copy_run(tiny_run, tmp_path / "run")
    (run / "neurons.parquet").unlink()
    with pytest.raises(StageError, match=r"neurons.parquet is missing: run the classify stage first"):
        tools.package(run)
    shutil.rmtree(run)
