"""The text simulators, the vision-LLM grid simulator and the offline embedding baseline."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image

from builder.simulate.base import FailureKind, SimulationFailure, VisualSample
from builder.simulate.grid import cell_to_patch_map, draw_numbered_grid, patch_coverage, simulator_view
from builder.simulate.text import LLMTextSimulator, TokenMatchSimulator, text_max_tokens, text_prompt
from builder.simulate.visual import EmbeddingSimilaritySimulator, LLMGridSimulator, visual_max_tokens
from builder.simulate.words import content_words, token_text


class FakeLLM:
    def __init__(self, *answers: str):
        self.answers = list(answers)
        self.calls: list[tuple[list, str]] = []

    async def __call__(self, messages, max_tokens):
        self.calls.append((messages, max_tokens))
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def test_content_words_and_token_text():
    assert content_words("words related to airplanes and airports") == ["airplanes", "airports"]
    assert content_words("the token 'red' (e.g. red circle)") == ["red", "circle"]
    assert token_text("Ġred") == "red" and token_text(" Red,") == "red" and token_text("▁the") == "the"


def test_token_match_baseline():
    sim = TokenMatchSimulator()
    preds = asyncio.run(sim.simulate("the word 'red'", [["a", " red", " circle"], [" reddish", "Ġred", "."], []]))
    np.testing.assert_array_equal(preds[0], [0, 10, 0])
    np.testing.assert_array_equal(preds[1], [10, 10, 0])  # a whole-prefix match counts
    assert preds[2].shape == (0,)
    assert asyncio.run(sim.simulate("trains", [[" train", " rain"]]))[0].tolist() == [10, 0]


def test_llm_text_simulator_prompt_and_answer():
    llm = FakeLLM('{"activations": [0, 9, 1]}')
    preds = asyncio.run(LLMTextSimulator(llm).simulate("the colour red", [["a", " red", " circle"]]))
    np.testing.assert_array_equal(preds[0], [0, 9, 1])
    messages, max_tokens = llm.calls[0]
    assert max_tokens == text_max_tokens(3) >= 3 * 4
    assert messages == text_prompt("the colour red", ["a", " red", " circle"])
    assert "this neuron activates for the colour red" in messages[1]["content"]
    assert "1\t'a'\n2\t' red'\n3\t' circle'" in messages[1]["content"]
    assert "exactly 3" in messages[1]["content"]


def test_llm_text_simulator_failures_are_typed():
    with pytest.raises(SimulationFailure) as e:
        asyncio.run(LLMTextSimulator(FakeLLM('{"activations": [1, 2]}')).simulate("red", [["a", "b", "c"]]))
    assert e.value.kind is FailureKind.WRONG_LENGTH
    with pytest.raises(SimulationFailure) as e:
        asyncio.run(LLMTextSimulator(FakeLLM("As an AI model I cannot")).simulate("red", [["a"]]))
    assert e.value.kind is FailureKind.UNPARSABLE


def test_llm_grid_simulator_maps_cells_onto_patches():
    llm = FakeLLM('{"activations": {"1": 10, "4": 4}}')
    sim = LLMGridSimulator(llm, cells=2, detail="low")
    img = Image.new("RGB", (30, 20), (0, 0, 255))
    preds = asyncio.run(sim.simulate("blue things", [VisualSample("s", img, img)], (6, 6)))
    expected = cell_to_patch_map(np.array([[10, 0], [0, 4.0]]), (6, 6))
    np.testing.assert_array_equal(preds[0], expected)
    assert preds[0][:3, :3].min() == 10 and preds[0][3:, 3:].min() == 4 and preds[0][:3, 3:].max() == 0
    messages, max_tokens = llm.calls[0]
    assert max_tokens == visual_max_tokens(2)
    parts = messages[1]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert parts[1] is sim.gridded(VisualSample("s", img, img))  # encoded once per sample
    assert parts[1]["image_url"]["detail"] == "low"
    assert "2x2 grid" in parts[0]["text"] and "1 to 4" in parts[0]["text"]


def test_llm_grid_simulator_failure_is_typed_not_zeros():
    sim = LLMGridSimulator(FakeLLM('{"activations": {"99": 3}}'), cells=2)
    img = Image.new("RGB", (8, 8))
    with pytest.raises(SimulationFailure) as e:
        asyncio.run(sim.simulate("x", [VisualSample("s", img, img)], (6, 6)))
    assert e.value.kind is FailureKind.UNPARSABLE


def test_grid_helpers():
    mask = np.zeros((48, 48), dtype=bool)
    mask[:, :12] = True
    np.testing.assert_allclose(patch_coverage(mask, (6, 6))[0], [1, 0.5, 0, 0, 0, 0])
    soft = np.zeros((10, 10))
    soft[:5, :5] = 1
    np.testing.assert_allclose(patch_coverage(soft, (3, 3)), [[1, 0.5, 0], [0.5, 0.25, 0], [0, 0, 0]])
    drawn = draw_numbered_grid(Image.new("RGB", (50, 40)), 8, size=320)
    assert drawn.size == (320, 320)
    assert np.asarray(drawn).max() > 0  # lines and numbers were drawn on black


def test_simulator_view_is_the_grid_square_at_full_resolution():
    from builder.models.layout import ImageLayout

    img = Image.new("RGB", (80, 40))
    img.paste((255, 0, 0), (20, 0, 60, 40))  # the centre square is red
    view = simulator_view(img, ImageLayout("llava", 6, 6, 0, exact=True, fit="crop"))
    assert view.size == (40, 40) and np.asarray(view)[..., 0].min() == 255
    assert simulator_view(img, ImageLayout("llava", 6, 6, 0, exact=True, fit="squash")).size == (80, 80)
    padded = np.asarray(simulator_view(img, ImageLayout("llava", 6, 6, 0, exact=True, fit="pad")))
    assert padded.shape == (80, 80, 3) and padded[0, 0].tolist() == [255, 255, 255]  # padding is white


def test_offline_embedding_baseline(tiny_vlm):
    from builder.models.layout import image_layout

    layout = image_layout(tiny_vlm.model.config, tiny_vlm.processor.image_processor)
    sim = EmbeddingSimilaritySimulator(tiny_vlm, layout, "Could you describe the image?")
    images = [Image.new("RGB", (60, 48), (255, 0, 0)), Image.new("RGB", (48, 48), (0, 0, 255))]
    samples = [VisualSample(str(i), simulator_view(im, layout), im) for i, im in enumerate(images)]
    grid = (layout.height, layout.width)
    preds = asyncio.run(sim.simulate("a red circle", samples, grid))
    assert [p.shape for p in preds] == [grid, grid]
    assert all(((p >= 0) & (p <= 10)).all() for p in preds)
    # the same by hand: 10 x max(0, max over words of the cosine of word and patch vectors)
    feats = sim.patch_features(samples)[0]
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1, atol=1e-5)
    words = sim.word_vectors(["red", "circle"]).numpy()
    cos = feats @ (words / np.linalg.norm(words, axis=-1, keepdims=True)).T
    np.testing.assert_allclose(preds[0].reshape(-1), np.clip(cos.max(-1), 0, None) * 10, atol=1e-5)
    # the features are the first decoder layer's input, as the full forward's hidden_states[0]
    import torch

    from builder.capture.inputs import encode_batch
    from builder.simulate.visual import first_layer_input

    batch = encode_batch(tiny_vlm.processor, images, ["", ""], "Could you describe the image?",
                         tiny_vlm.image_token_id, [0, 1])
    with torch.inference_mode():
        full = tiny_vlm.model.model(**batch.inputs, output_hidden_states=True).hidden_states[0]
        torch.testing.assert_close(first_layer_input(tiny_vlm, batch.inputs), full)
    # features are cached per sample; no content word gives a constant (zero) prediction
    assert set(sim._features) == {"0", "1"}
    assert all(p.sum() == 0 for p in asyncio.run(sim.simulate("the things of the", samples, grid)))
    assert json.dumps(preds[0].tolist())  # plain floats
