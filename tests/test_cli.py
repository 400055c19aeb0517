"""The command line: the tiny build end to end, listing recipes, and one-line recipe errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builder.cli import app

runner = CliRunner()


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_recipes_lists_bundled_recipes() -> None:
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert "tiny" in names and "llava15-7b" in names


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "classify.bogus=1"], "classify.bogus"),
        (["--set", "classify.visual_threshold=11"], "classify.visual_threshold"),
        (["--set", "corpus.kind=folder", "--set", "corpus.path=/no/such/folder"], "/no/such/folder"),
        (["--force", "nostage"], "nostage"),
        # A check across sections names its keys, not the whole recipe.
        (["--set", "classify.visual_min_tokens=9"], "classify.visual_min_tokens"),
    ],
)
def test_recipe_errors_exit_nonzero_with_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["--recipe", "tiny", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1
    lines = _error_lines(result)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert len(errors[0]) < 300 and "'recipe':" not in errors[0]  # one line, not the recipe
    assert "Traceback" not in result.output


def test_a_folder_named_like_a_recipe_does_not_hide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["--recipe", "tiny", "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "plan for recipe 'tiny'" in result.output


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--recipe", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "nope.yaml" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_tiny_build_from_the_console_script(tmp_path: Path) -> None:
    """The README's first command, as a user runs it: a real process, from another folder."""
    out = tmp_path / "runs" / "tiny"
    env_cmd = [sys.executable, "-m", "builder", "--recipe", "tiny", "--out", str(out)]
    first = subprocess.run(env_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    from datasets import load_dataset

    dataset = out / "dataset"
    neurons = load_dataset(str(dataset), "neurons", split="train", download_mode="force_redownload")
    from builder.models.builtin import TinyLlavaSpec

    spec = TinyLlavaSpec()
    assert neurons.num_rows == spec.text_layers * spec.intermediate
    expected = {"layer", "neuron", "category", "p_visual", "p_text", "p_multimodal", "p_unknown", "confidence",
                "high_confidence", "max_activation", "mean_visual", "mean_text", "top_sample_ids"}
    assert expected <= set(neurons.column_names)
    assert sorted(set(zip(neurons["layer"], neurons["neuron"]))) == [
        (l, n) for l in range(spec.text_layers) for n in range(spec.intermediate)]
    layers = load_dataset(str(dataset), "layers", split="train", download_mode="force_redownload")
    assert layers.num_rows == spec.text_layers
    samples = load_dataset(str(dataset), "samples", split="train", download_mode="force_redownload")
    assert samples.num_rows > 0 and set(samples["text_source"]) == {"caption"}
    second = subprocess.run(env_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0
    assert "every stage up to date" in second.stderr
