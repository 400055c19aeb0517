"""`--dry-run`: the plan of the paper's recipe, offline, without loading weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from builder.cli import app
from builder.config import load_recipe
from builder.plan import make_plan, model_shape


@pytest.fixture()
def detail_23k(tmp_path: Path) -> tuple[Path, Path]:
    """A small detail_23k-style JSON with a COCO-style image folder (one image missing)."""
    root = tmp_path / "train2017"
    root.mkdir()
    records = []
    for i in range(37):
        name = f"{i:012d}.jpg"
        if i != 5:
            Image.new("RGB", (64, 48), (i * 6, 20, 200)).save(root / name)
        records.append({"id": name[:-4], "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the photo?"}, {"from": "gpt", "value": f"Picture {i}."}]})
    path = tmp_path / "detail_23k.json"
    path.write_text(json.dumps(records))
    return path, root


def _sets(path: Path, root: Path, *extra: str) -> list[str]:
    return [f"corpus.path={path}", f"corpus.image_root={root}", *extra]


def test_plan_numbers_trace_to_the_recipe(detail_23k) -> None:
    path, root = detail_23k
    recipe = load_recipe("llava15-7b", _sets(path, root))
    plan = make_plan(recipe, ["corpus", "capture"])
    # No config is available offline for the Hub id: the recipe's declared shape is used.
    assert plan.shape.source == "recipe"
    assert plan.neurons == 352_256
    assert (plan.samples, plan.missing_images) == (37, 1)
    seq = 576 + recipe.plan.template_tokens + recipe.text.max_new_tokens
    # `auto` batch sizes, for an 80 GiB GPU holding the bf16 weights (language model + ~0.6 B vision).
    assert recipe.capture.batch_size == recipe.text.batch_size == "auto"
    free = 80 * 2**30 - (plan.shape.parameters_b + 0.6) * 2e9
    per_token = (8 * 4096 + 3 * 11008) * 2 + 20 * 11008
    assert plan.capture_batch_size == math.floor(0.7 * int(free) / (per_token * seq)) == 166
    kv_per_token = 2 * 32 * 4096 * 2
    prompt = 576 + recipe.plan.template_tokens
    per_sample = kv_per_token * (prompt + recipe.text.max_new_tokens) + prompt * (8 * 4096 + 3 * 11008) * 2
    assert plan.generate_batch_size == math.floor(0.7 * int(free) / per_sample)
    assert plan.batches == 1 and "auto" in plan.batch_note
    # Decoding reads the weights and the batch's KV caches every step; the prefill is compute-bound.
    step_bytes = plan.shape.parameters_b * 2e9 + plan.generate_batch_size * (prompt + 128) * kv_per_token
    decode = 256 * step_bytes / (recipe.plan.memory_bandwidth_gbs * 1e9 * recipe.plan.utilisation)
    prefill = 2 * plan.shape.parameters_b * 1e9 * prompt * 36 / (recipe.plan.peak_tflops * 1e12 * recipe.plan.utilisation)
    assert plan.generate_seconds == pytest.approx(decode + prefill)
    gpu = plan.capture_seconds + plan.generate_seconds
    eight = make_plan(load_recipe("llava15-7b", _sets(path, root, "plan.gpus=8")), [])
    assert "of wall time on 1 GPU " in plan.render() and eight.gpus == 8
    assert f"~{gpu / 8 / 60:.1f} min of wall time on 8 GPUs" in eight.render()
    fixed = make_plan(load_recipe("llava15-7b", _sets(path, root, "capture.batch_size=16")), [])
    assert (fixed.capture_batch_size, fixed.batches) == (16, 3)
    flops = 2 * plan.shape.parameters_b * 1e9 * seq * 36
    assert plan.capture_seconds == pytest.approx(flops / (recipe.plan.peak_tflops * 1e12 * recipe.plan.utilisation))
    assert 6.0 < plan.shape.parameters_b < 7.0  # Vicuna-7B's language model
    assert plan.generate_tokens == 36 * recipe.text.max_new_tokens
    # The explainer's upper bound: every (layer, category) quota filled, priced at GPT-4o's rates.
    assert plan.explain_neurons == 32 * len(recipe.exemplars.categories) * recipe.exemplars.per_category
    assert plan.explain_dollars > 0
    # The simulators' LLM requests (phrases for grounding, per-sample text predictions), from
    # the simulate stage's own estimate; none when every simulator runs locally.
    from builder.simulate.plan import estimate_simulate_cost

    expected = estimate_simulate_cost(recipe, 32)
    assert (plan.simulate_requests, plan.simulate_dollars) == (expected["simulate_requests"],
                                                               expected["simulate_dollars"])
    assert plan.simulate_requests > plan.explain_requests and plan.simulate_dollars > 0
    offline = make_plan(load_recipe("llava15-7b", _sets(path, root, "simulate.backend=offline")), [])
    assert offline.simulate_requests == 0 and "no LLM requests" in offline.render()
    # A measured throughput replaces the roofline estimate.
    measured = make_plan(load_recipe("llava15-7b", _sets(path, root, "plan.capture_samples_per_second=12")), [])
    assert measured.capture_seconds == pytest.approx(36 / 12)
    assert "measured" in measured.time_source


def test_local_config_gives_the_shape(tmp_path: Path) -> None:
    from transformers import LlavaConfig

    folder = tmp_path / "llava"
    LlavaConfig().save_pretrained(folder)  # LlavaConfig's defaults are LLaVA-1.5-7B's shape
    shape = model_shape(load_recipe("llava15-7b", [f"model.id={folder}"]))
    assert (shape.layers, shape.neurons_per_layer, shape.image_tokens, shape.source) == (32, 11008, 576, "local config")


def test_dry_run_cli_offline_without_weights(detail_23k, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path, root = detail_23k
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_loading(*args, **kwargs):
        raise AssertionError("--dry-run must not load the model")

    monkeypatch.setattr("builder.models.loading.load_vlm", no_loading)
    args = ["--recipe", "llava15-7b", "--out", str(tmp_path / "run"), "--dry-run"]
    for s in _sets(path, root):
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "352,256 neurons" in result.output
    assert "37 (1 with a missing image file" in result.output
    assert "1 batches of 166" in result.output and "batch size auto" in result.output
    assert "$" in result.output and "simulate    960 neurons" in result.output
    assert not (tmp_path / "run" / "samples.parquet").exists(), "nothing runs"
    missing = CliRunner().invoke(app, ["--recipe", "llava15-7b", "--dry-run", "--out", str(tmp_path / "r2"),
                                       "--set", f"corpus.path={tmp_path / 'absent.json'}"])
    assert missing.exit_code == 1 and "absent.json" in missing.output


def test_built_in_shapes_come_from_their_configs() -> None:
    """Each built-in's own config, LLaVA-NeXT's tiled image tokens included."""
    from builder.config import ModelConfig
    from builder.models.layout import image_tokens_bound
    from builder.models.loading import load_vlm

    for recipe, builtin in (("tiny", "builtin:planted-llava"), ("tiny-llava-next", "builtin:tiny-llava-next")):
        shape = model_shape(load_recipe(recipe))
        vlm = load_vlm(ModelConfig(id=builtin, device="cpu"))
        text = vlm.model.config.text_config
        assert (shape.layers, shape.neurons_per_layer, shape.source) == (text.num_hidden_layers,
                                                                         text.intermediate_size, "built-in")
        assert shape.image_tokens == image_tokens_bound(vlm.model.config)
    assert model_shape(load_recipe("tiny-llava-next")).image_tokens > model_shape(load_recipe("tiny")).image_tokens
