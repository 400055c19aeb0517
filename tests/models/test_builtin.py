"""The built-in tiny LLaVA: deterministic, saved with save_pretrained, loaded with from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builder.config import ModelConfig
from builder.errors import ModelError
from builder.models.builtin import TinyLlavaSpec, build_tiny_llava, materialize_builtin
from builder.models.loading import find_decoder_mlps, load_vlm


def test_round_trip_through_from_pretrained(tmp_path: Path) -> None:
    folder = materialize_builtin("tiny-llava", seed=0, root=tmp_path)
    assert (folder / "config.json").exists()
    assert any(folder.glob("*.safetensors"))
    assert (folder / "tokenizer.json").exists() and (folder / "processor_config.json").exists() or any(
        folder.glob("*processor*.json"))
    vlm = load_vlm(ModelConfig(id=str(folder), device="cpu"))
    fresh, processor = build_tiny_llava(TinyLlavaSpec(seed=0))
    loaded = dict(vlm.model.state_dict())
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    # The processor round-trips: same tokens and image-token expansion.
    text = "USER: <image>\nCould you describe the image? ASSISTANT: a red circle"
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 10, 10))
    a = vlm.processor(images=[image], text=[text], return_tensors="pt")
    b = processor(images=[image], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.allclose(a["pixel_values"], b["pixel_values"])
    n_image = int((a["input_ids"] == vlm.image_token_id).sum())
    assert n_image == TinyLlavaSpec().grid ** 2


def test_deterministic_from_seed_and_seed_changes_weights() -> None:
    m0, _ = build_tiny_llava(TinyLlavaSpec(seed=0))
    m0b, _ = build_tiny_llava(TinyLlavaSpec(seed=0))
    m1, _ = build_tiny_llava(TinyLlavaSpec(seed=1))
    w = "model.language_model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(m0.state_dict()[w], m0b.state_dict()[w])
    assert not torch.equal(m0.state_dict()[w], m1.state_dict()[w])


def test_builtin_goes_through_the_cache(builder_cache: Path) -> None:
    vlm = load_vlm(ModelConfig(id="builtin:tiny-llava", device="cpu"))
    assert Path(vlm.model_path).is_relative_to(builder_cache)
    assert len(vlm.mlps()) == TinyLlavaSpec().text_layers
    assert vlm.mlps()[0].width == TinyLlavaSpec().intermediate
    prov = vlm.provenance()
    assert prov["layers"] == 4 and prov["neurons_per_layer"] == 96


def test_unknown_builtin_and_missing_folder() -> None:
    with pytest.raises(ModelError, match="builtin:tiny-llava"):
        load_vlm(ModelConfig(id="builtin:nope", device="cpu"))
    with pytest.raises(ModelError, match="model.id"):
        load_vlm(ModelConfig(id="/definitely/not/here", device="cpu"))


def test_decoder_mlps_found_by_structure_not_vision_tower(tiny_vlm) -> None:
    mlps = find_decoder_mlps(tiny_vlm.model)
    lm_layers = tiny_vlm.model.model.language_model.layers
    assert [m.module for m in mlps] == [layer.mlp for layer in lm_layers]
    with pytest.raises(ModelError, match="no LLaMA-style decoder MLPs"):
        find_decoder_mlps(torch.nn.Linear(2, 2))
