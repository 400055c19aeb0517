"""`batch_size: auto`: the memory estimates, the choice from free GPU memory, the image-token
bound, and that a resumed capture keeps the batching of the run it resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from builder.capture import memory
from builder.capture.memory import (
    CPU_BATCH_SIZE,
    BatchChoice,
    LanguageModelShape,
    batch_size_for,
    capture_bytes_per_sample,
    choose_batch_size,
    generate_bytes_per_sample,
)
from builder.capture.state import NeuronState, read_state_metadata
from builder.models.layout import image_tokens_bound
from tests.capture.test_capture_runs import _prepared, assert_same_state

LLAVA_7B = LanguageModelShape(layers=32, hidden=4096, width=11008, bytes_per_value=2)


def test_capture_estimate_for_the_7b_shape() -> None:
    # Per token: (8 * 4096 + 3 * 11008) * 2 model bytes + 20 * 11008 hook bytes = 351,744.
    assert capture_bytes_per_sample(LLAVA_7B, 1) == 351_744
    assert capture_bytes_per_sample(LLAVA_7B, 650) == 650 * 351_744  # ~218 MiB a sample
    # bf16 halves the model's part, not the hooks' float32 work.
    fp32 = LanguageModelShape(32, 4096, 11008, 4)
    assert capture_bytes_per_sample(fp32, 1) - capture_bytes_per_sample(LLAVA_7B, 1) == (8 * 4096 + 3 * 11008) * 2


def test_generate_estimate_is_the_kv_cache_plus_the_prefill() -> None:
    kv_per_token = 2 * 32 * 4096 * 2  # K and V, every layer, bf16: 512 KiB
    prefill = 600 * (8 * 4096 + 3 * 11008) * 2
    assert generate_bytes_per_sample(LLAVA_7B, 600, 256) == kv_per_token * 856 + prefill


def test_batch_size_for_free_memory() -> None:
    per_sample = capture_bytes_per_sample(LLAVA_7B, 650)
    free = 64 * 2**30  # an 80 GB card holding the 14 GB of weights
    assert batch_size_for(free, per_sample) == int(0.7 * free // per_sample) == 210
    assert batch_size_for(free, per_sample, cap=64) == 64
    assert batch_size_for(10, per_sample) == 1  # never zero: the forward pass decides
    with pytest.raises(ValueError):
        batch_size_for(free, 0)


def test_choose_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    def never() -> int:
        raise AssertionError("the estimate is only needed for auto on a GPU")

    assert choose_batch_size(12, "cuda:0", never) == BatchChoice(12, "recipe")
    assert choose_batch_size("auto", torch.device("cpu"), never).size == CPU_BATCH_SIZE
    seen = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (seen.append(device) or (40 * 2**30, 80 * 2**30)))
    choice = choose_batch_size("auto", "cuda:1", lambda: 2**30)
    assert choice.size == 28 and "40.0 of 80.0 GiB free on cuda:1" in choice.reason
    assert seen == [torch.device("cuda:1")]


def test_image_token_bound_matches_the_processor(tiny_vlm) -> None:
    """LLaVA-1.5: the bound is the exact count the processor expands `<image>` to."""
    from builder.capture.inputs import encode_batch

    image = Image.new("RGB", (50, 30), (10, 200, 30))
    batch = encode_batch(tiny_vlm.processor, [image], ["a green box"], "Describe.", tiny_vlm.image_token_id, [0])
    assert int(batch.visual_mask.sum()) == image_tokens_bound(tiny_vlm.model.config)


def test_image_token_bound_covers_llava_next() -> None:
    from transformers import LlavaNextConfig

    from builder.capture.inputs import encode_batch
    from builder.models.loading import load_vlm
    from builder.config import ModelConfig

    # The published LLaVA-NeXT layout: base 576 + 4 tiles of 576 + 48 row newlines.
    assert image_tokens_bound(LlavaNextConfig()) == 2928
    vlm = load_vlm(ModelConfig(id="builtin:tiny-llava-next", device="cpu"))
    bound = image_tokens_bound(vlm.model.config)
    counts = []
    for size in [(64, 64), (200, 40), (40, 200), (300, 300), (90, 50)]:
        batch = encode_batch(vlm.processor, [Image.new("RGB", size)], ["x"], "Describe.", vlm.image_token_id, [0])
        counts.append(int(batch.visual_mask.sum()))
    assert max(counts) <= bound and len(set(counts)) > 1, (counts, bound)


def test_the_capture_estimate_bounds_a_measured_forward_pass(tiny_vlm) -> None:
    """Peak memory of a hooked capture forward (CPU profiler), per extra sample in the batch,
    against the estimate for the same sequence length: an upper bound, not a wild one."""
    from builder.capture.hooks import neuron_hooks
    from builder.capture.inputs import encode_batch
    from builder.capture.memory import measure_peak_bytes, shape_of
    from builder.capture.stage import _base_forward
    from builder.capture.state import BatchPositions, WorkBuffer

    mlps = tiny_vlm.mlps()
    state = NeuronState.empty(len(mlps), mlps[0].width, 50, 8, "cpu")

    def peak(batch_size: int) -> tuple[int, int]:
        images = [Image.new("RGB", (48, 48), (20 * i, 0, 0)) for i in range(batch_size)]
        batch = encode_batch(tiny_vlm.processor, images, [" ".join(["red"] * 120)] * batch_size, "Describe.",
                             tiny_vlm.image_token_id, list(range(batch_size)), padding_side="right")
        positions = BatchPositions.from_masks(batch.visual_mask, batch.text_mask, batch.sample_index, WorkBuffer())
        forward = _base_forward(tiny_vlm.model)
        with torch.inference_mode(), neuron_hooks(mlps, "act_fn", lambda l, a: state.update_layer(l, a, positions)):
            return measure_peak_bytes(lambda: forward(**batch.inputs), "cpu"), batch.inputs["input_ids"].shape[1]

    (one, tokens), (eight, _) = peak(1), peak(8)
    measured = (eight - one) / 7
    estimate = capture_bytes_per_sample(shape_of(tiny_vlm.model), tokens)
    assert measured > 0
    assert 1.0 <= estimate / measured <= 4.0, (estimate, measured)


def test_capture_forward_builds_no_kv_cache(tiny_vlm) -> None:
    from builder.capture.inputs import encode_batch
    from builder.capture.stage import _base_forward

    batch = encode_batch(tiny_vlm.processor, [Image.new("RGB", (32, 32))], ["a box"], "Describe.",
                         tiny_vlm.image_token_id, [0])
    with torch.inference_mode():
        out = _base_forward(tiny_vlm.model)(**batch.inputs)
    assert getattr(out, "past_key_values", None) is None


def test_resumed_auto_capture_keeps_the_interrupted_runs_batch_size(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.capture import stage

    ex = _prepared(tmp_path, ["capture.batch_size=auto", "capture.checkpoint_every=2"])
    checkpoint = tmp_path / "capture" / "shard.safetensors"
    checkpoint.parent.mkdir(exist_ok=True)
    # First run: `auto` comes out at 3; it is killed during its fifth batch.
    monkeypatch.setattr(stage, "choose_batch_size", lambda *a: BatchChoice(3, "test"))
    calls = {"n": 0}
    real_update = NeuronState.update_layer
    layers = ex.ctx.vlm.model.config.text_config.num_hidden_layers

    def dying_update(self, *args):
        calls["n"] += 1
        if calls["n"] > 4 * layers:
            raise KeyboardInterrupt
        return real_update(self, *args)

    monkeypatch.setattr(NeuronState, "update_layer", dying_update)
    with pytest.raises(KeyboardInterrupt):
        stage.capture_shard(ex.ctx, stage.Shard(0, 1), checkpoint)
    meta = read_state_metadata(checkpoint)
    assert (meta["batches_done"], meta["batch_size"], meta["complete"]) == ("4", "3", "0")

    # The rerun's `auto` would now be 5; it resumes with 3, so batch 5 starts at sample 12.
    monkeypatch.setattr(NeuronState, "update_layer", real_update)
    monkeypatch.setattr(stage, "choose_batch_size", lambda *a: BatchChoice(5, "test"))
    resumed = stage.capture_shard(ex.ctx, stage.Shard(0, 1), checkpoint)
    assert read_state_metadata(checkpoint)["batch_size"] == "3"
    monkeypatch.setattr(stage, "choose_batch_size", lambda *a: BatchChoice(3, "test"))
    clean = stage.capture_shard(ex.ctx, stage.Shard(0, 1), tmp_path / "capture" / "clean.safetensors")
    assert_same_state(resumed, clean)


def test_auto_on_cpu_is_the_cpu_default(tmp_path: Path) -> None:
    from builder.capture import stage

    ex = _prepared(tmp_path, ["capture.batch_size=auto"])
    assert memory.CPU_BATCH_SIZE == 8
    out = tmp_path / "capture" / "shard.safetensors"
    out.parent.mkdir(exist_ok=True)
    stage.capture_shard(ex.ctx, stage.Shard(0, 1), out)
    assert read_state_metadata(out)["batch_size"] == "8"
