"""The second model family: a tiny LLaVA-NeXT through loading, capture masks, layout and a build."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from builder.capture.inputs import encode_batch
from builder.config import ModelConfig, load_recipe
from builder.errors import ModelError
from builder.models.builtin import TinyLlavaSpec, materialize_builtin
from builder.models.layout import image_layout
from builder.models.llava_next import build_tiny_llava_next
from builder.models.loading import LoadedVLM, load_vlm
from builder.text import teacher_forced_text

PROMPT = "Could you describe the image?"
SPEC = TinyLlavaSpec()
BASE = SPEC.grid**2  # 36 base-view tokens

# (width, height): square, wide, tall, large 4:3: each selects a different tile layout.
SIZES = [(48, 48), (100, 40), (30, 90), (200, 150)]
DESCRIPTIONS = ["a red circle", "a blue square above a green triangle next to a white circle", "x", "a yellow triangle"]


@pytest.fixture(scope="module")
def next_vlm(builder_cache: Path) -> LoadedVLM:
    return load_vlm(ModelConfig(id="builtin:tiny-llava-next", device="cpu"))


def images() -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i, 200, 255 - 40 * i)) for i, size in enumerate(SIZES)]


def test_round_trip_through_from_pretrained(tmp_path: Path) -> None:
    folder = materialize_builtin("tiny-llava-next", seed=0, root=tmp_path)
    vlm = load_vlm(ModelConfig(id=str(folder), device="cpu"))
    assert type(vlm.model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(vlm.processor).__name__ == "LlavaNextProcessor"
    fresh, processor = build_tiny_llava_next(SPEC)
    loaded = dict(vlm.model.state_dict())
    assert loaded.keys() == fresh.state_dict().keys()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert "model.image_newline" in loaded
    assert vlm.model.config.image_grid_pinpoints == [[48, 96], [96, 48], [96, 96], [144, 48], [48, 144]]
    text = "USER: <image>\nCould you describe the image? ASSISTANT: a red circle"
    a = vlm.processor(images=images(), text=[text] * len(SIZES), return_tensors="pt", padding=True)
    b = processor(images=images(), text=[text] * len(SIZES), return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.allclose(a["pixel_values"], b["pixel_values"])
    assert len(vlm.mlps()) == SPEC.text_layers and vlm.mlps()[0].width == SPEC.intermediate
    assert vlm.image_token_id == processor.image_token_id


def test_builtin_name_resolves_through_the_cache(next_vlm: LoadedVLM, builder_cache: Path) -> None:
    assert Path(next_vlm.model_path).is_relative_to(builder_cache)
    assert next_vlm.provenance()["architecture"] == "LlavaNextForConditionalGeneration"
    with pytest.raises(ModelError, match="builtin:tiny-llava-next"):
        load_vlm(ModelConfig(id="builtin:nope", device="cpu"))


@pytest.mark.parametrize("side", ["left", "right"])
def test_masks_match_the_image_tokens_the_model_fills(next_vlm: LoadedVLM, side: str) -> None:
    processor = copy.deepcopy(next_vlm.processor)
    processor.tokenizer.padding_side = side
    batch = encode_batch(processor, images(), DESCRIPTIONS, PROMPT, next_vlm.image_token_id, [0, 1, 2, 3])
    ids, attention = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    pad_column = 0 if side == "left" else -1
    assert not attention[:, pad_column].all()  # the batch really is padded on this side

    # Visual = exactly the processor's own image-token positions ...
    texts = [teacher_forced_text(processor, PROMPT, d)[0] for d in DESCRIPTIONS]
    direct = processor(images=images(), text=texts, return_tensors="pt", padding=True)
    assert torch.equal(batch.visual_mask, (direct["input_ids"] == processor.image_token_id) & attention)
    # ... which are as many as the image features the model writes into them (anyres
    # tiles and row newlines included), and differ per image size.
    with torch.no_grad():
        features = next_vlm.model.model.get_image_features(
            batch.inputs["pixel_values"], batch.inputs["image_sizes"]).pooler_output
    counts = batch.visual_mask.sum(dim=1).tolist()
    assert counts == [f.shape[0] for f in features]
    assert counts == [78, 138, 96, 166]
    assert all(c > BASE for c in counts)

    # Text = the description's tokens only, never an image, template or pad position.
    assert not (batch.text_mask & batch.visual_mask).any()
    assert not (batch.text_mask & ~attention).any()
    for i, description in enumerate(DESCRIPTIONS):
        assert processor.tokenizer.decode(ids[i][batch.text_mask[i]]).strip() == description
        # The description is the end of the sequence; the image tokens all precede it.
        text_pos = batch.text_mask[i].nonzero().flatten()
        last_real = attention[i].nonzero().flatten()[-1]
        assert text_pos[-1] == last_real
        assert batch.visual_mask[i].nonzero().flatten()[-1] < text_pos[0]

    # The forward pass takes the mixed-size batch.
    with torch.no_grad():
        out = next_vlm.model(**batch.inputs)
    assert out.logits.shape[:2] == ids.shape


def test_masks_do_not_depend_on_the_padding_side(next_vlm: LoadedVLM) -> None:
    per_side = {}
    for side in ("left", "right"):
        processor = copy.deepcopy(next_vlm.processor)
        processor.tokenizer.padding_side = side
        b = encode_batch(processor, images(), DESCRIPTIONS, PROMPT, next_vlm.image_token_id, [0, 1, 2, 3])
        attention = b.inputs["attention_mask"].bool()
        per_side[side] = [(b.visual_mask[i][attention[i]], b.text_mask[i][attention[i]]) for i in range(len(SIZES))]
    for (vl, tl), (vr, tr) in zip(per_side["left"], per_side["right"]):
        assert torch.equal(vl, vr) and torch.equal(tl, tr)


def test_llava_next_layout_is_the_base_view_then_tiles_with_newlines(next_vlm: LoadedVLM) -> None:
    layout = image_layout(next_vlm.model.config, next_vlm.processor.image_processor)
    assert (layout.family, layout.height, layout.width, layout.offset, layout.exact) == ("llava_next", 6, 6, 0, False)
    inner = next_vlm.model.model
    batch = next_vlm.processor(images=images(), text=["<image>"] * len(SIZES), return_tensors="pt", padding=True)
    with torch.no_grad():
        features = inner.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        # The base view: the image resized to one tile, through the tower and projector.
        hidden = inner.vision_tower(batch["pixel_values"][:, 0], output_hidden_states=True).hidden_states[-2][:, 1:]
        base = inner.multi_modal_projector(hidden)
    rows_seen = set()
    for i, f in enumerate(features):
        grid = layout.grid_indices(f.shape[0])
        assert torch.allclose(f[grid], base[i], atol=1e-5)
        # After the grid: tile rows, each ending with the newline embedding.
        tiles = f[layout.cells:]
        is_newline = torch.isclose(tiles, inner.image_newline.expand_as(tiles), atol=1e-6).all(dim=1)
        rows = int(is_newline.sum())
        width = tiles.shape[0] // rows - 1
        assert rows * (width + 1) == tiles.shape[0]
        assert is_newline.nonzero().flatten().tolist() == [r * (width + 1) + width for r in range(rows)]
        rows_seen.add((rows, width))
    assert len(rows_seen) == len(SIZES)  # each size got its own tile layout

    # heatmap(): values at the visual positions -> the fixed 6x6 grid, row-major.
    values = torch.arange(166.0)
    assert torch.equal(layout.heatmap(values), torch.arange(36.0).view(6, 6))
    assert layout.heatmap(torch.stack([values, -values])).shape == (2, 6, 6)
    with pytest.raises(ModelError, match="at least 36"):
        layout.grid_indices(20)
    # The base view is the whole image squashed to a square.
    assert layout.image_box(100, 40) == (0.0, 0.0, 100.0, 40.0)


def test_llava15_layout_is_all_image_tokens(tiny_vlm: LoadedVLM) -> None:
    layout = image_layout(tiny_vlm.model.config, tiny_vlm.processor.image_processor)
    assert (layout.family, layout.height, layout.width, layout.offset, layout.exact) == ("llava", 6, 6, 0, True)
    assert torch.equal(layout.grid_indices(36), torch.arange(36))
    with pytest.raises(ModelError, match="expected 36"):
        layout.grid_indices(37)
    # CLIP's processor centre-crops: the grid covers the central square.
    assert layout.fit == "crop"
    assert layout.image_box(100, 40) == (30.0, 0.0, 70.0, 40.0)
    # An image processor that pads to square: the grid covers the padded square.
    padded = image_layout(tiny_vlm.model.config, SimpleNamespace(do_pad=True))
    assert padded.fit == "pad" and padded.image_box(100, 40) == (0.0, -30.0, 100.0, 70.0)
    # A kept CLS feature ("full" strategy) comes first, one position before the grid.
    full = copy.deepcopy(tiny_vlm.model.config)
    full.vision_feature_select_strategy = "full"
    full_layout = image_layout(full)
    assert full_layout.offset == 1 and torch.equal(full_layout.grid_indices(37), torch.arange(1, 37))


def test_layout_of_an_unknown_family_names_the_fix() -> None:
    from transformers import LlamaConfig

    with pytest.raises(ModelError, match="'llama': no image layout.*layout.py"):
        image_layout(LlamaConfig())


@pytest.mark.slow
def test_tiny_llava_next_build_validates(builder_cache: Path, tmp_path: Path) -> None:
    from builder.corpus.base import open_image
    from builder.corpus.stage import read_samples
    from builder.pipeline import default_stages
    from builder.run import Executor
    from validation import validate_dataset

    recipe = load_recipe("tiny-llava-next")
    Executor(recipe, tmp_path, default_stages()).run()
    report = validate_dataset(tmp_path / "dataset")
    assert report.ok, report.failures
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "LlavaNextForConditionalGeneration"
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    counts = manifest["stages"]["capture"]["counts"]
    assert counts["neurons"] == SPEC.text_layers * SPEC.intermediate
    # Every sample's visual positions are all its image tokens (base view, tiles, newlines).
    samples = read_samples(tmp_path / "samples.parquet")
    processor = load_vlm(recipe.model).processor
    expected = 0
    for s in samples:
        enc = processor(images=[open_image(s.image_ref, recipe.corpus)], text=["<image>"], return_tensors="pt")
        expected += int((enc["input_ids"] == processor.image_token_id).sum())
    assert counts["visual_positions"] == expected > len(samples) * BASE


def test_batched_generation_with_mixed_image_sizes(next_vlm: LoadedVLM) -> None:
    """The text stage's `generate` source: one left-padded batch of differently tiled images."""
    from builder.text import prompt_prefix

    prefix = prompt_prefix(next_vlm.processor, PROMPT)
    inputs = next_vlm.processor(images=images(), text=[prefix] * len(SIZES), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = next_vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (len(SIZES), inputs["input_ids"].shape[1] + 4)
    # Each row continues its own prompt: same as generating that sample alone.
    single = next_vlm.processor(images=images()[1:2], text=[prefix], return_tensors="pt")
    with torch.no_grad():
        alone = next_vlm.model.generate(**single, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[1, -4:], alone[0, -4:])
