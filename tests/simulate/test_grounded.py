"""The grounded simulator end to end with tiny random-weight Grounding DINO and SAM: shapes,
the box -> mask -> patch mapping, the phrase plumbing and the real from_pretrained loading."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image

from builder.errors import ModelError
from builder.simulate.base import FailureKind, SimulationFailure, VisualSample
from builder.simulate.grid import patch_coverage
from builder.simulate.grounded import GroundedSimulator, load_grounding_models


@pytest.fixture(scope="module")
def models(grounding_folders):
    detector, segmenter = grounding_folders
    return load_grounding_models(str(detector), str(segmenter), device="cpu")


def _image(w: int = 80, h: int = 60) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 240, 240))
    img.paste((200, 20, 20), (10, 10, 40, 40))
    return img


class FakeLLM:
    """Stands in for the call layer: records (messages, max_tokens), answers a fixed text."""

    def __init__(self, answer: str):
        self.answer = answer
        self.calls: list[tuple[list, str]] = []

    async def __call__(self, messages, max_tokens):
        self.calls.append((messages, max_tokens))
        return self.answer


def test_loading_is_from_pretrained_of_the_recipe_ids(models):
    assert type(models.detector).__name__ == "GroundingDinoForObjectDetection"
    assert type(models.segmenter).__name__ == "SamModel"
    assert type(models.detector_processor).__name__ == "GroundingDinoProcessor"
    assert str(models.device) == "cpu"


def test_missing_model_is_a_one_line_error(tmp_path, grounding_folders):
    with pytest.raises(ModelError, match=r"simulate.detector=.*cannot load"):
        load_grounding_models(str(tmp_path / "nowhere"), str(grounding_folders[1]))


def test_detect_and_segment_shapes(models):
    sim = GroundedSimulator(models, None, phrases="explanation", box_threshold=0.0, text_threshold=0.0, max_boxes=4)
    img = _image()
    boxes, scores = sim.detect(img, ["a red square"])
    assert boxes.shape == (4, 4) and scores.shape == (4,)
    assert (np.diff(scores) <= 0).all()  # best first
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= 80).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= 60).all()
    mask = sim.segment(img, boxes)
    assert mask.shape == (60, 80) and mask.dtype == bool
    assert sim.segment(img, np.zeros((0, 4))).sum() == 0


def test_prediction_is_mask_coverage_of_each_patch(models, monkeypatch):
    sim = GroundedSimulator(models, None, phrases="explanation")
    mask = np.zeros((48, 48), dtype=bool)
    mask[:24, :12] = True  # top half of the first column and a half
    monkeypatch.setattr(sim, "detect", lambda image, phrases: (np.array([[0, 0, 12, 24]], float), np.array([0.9])))
    monkeypatch.setattr(sim, "segment", lambda image, boxes: mask)
    pred = sim.predict(Image.new("RGB", (48, 48)), ["red"], (6, 6))
    expected = np.zeros((6, 6))
    expected[:3, 0] = 10
    expected[:3, 1] = 5
    np.testing.assert_allclose(pred, expected)


def test_end_to_end_with_llm_phrases(models):
    llm = FakeLLM('Sure! ```json\n{"phrases": ["red square", "a circle", "red square"]}\n```')
    sim = GroundedSimulator(models, llm, phrases="llm", max_phrases=3, box_threshold=0.0, text_threshold=0.0,
                            max_boxes=3)
    samples = [VisualSample(str(i), _image(64, 64), _image(64, 64)) for i in range(2)]
    preds = asyncio.run(sim.simulate("red squares", samples, (6, 6)))
    assert [p.shape for p in preds] == [(6, 6), (6, 6)]
    assert all(((p >= 0) & (p <= 10)).all() for p in preds)
    # the plumbing: each prediction is 10 x the coverage of the union mask of the detected boxes
    view = samples[0].view
    boxes, _ = sim.detect(view, ["red square", "a circle"])
    np.testing.assert_allclose(preds[0], patch_coverage(sim.segment(view, boxes), (6, 6)) * 10, atol=1e-6)
    # phrases asked once per explanation, deduplicated, with a prompt naming the explanation
    assert len(llm.calls) == 1 and llm.calls[0][1] == 32 + 16 * 3
    assert "red squares" in json.dumps(llm.calls[0][0])
    assert asyncio.run(sim.phrases("red squares")) == ["red square", "a circle"]


def test_nothing_found_predicts_zero(models):
    sim = GroundedSimulator(models, FakeLLM('{"phrases": []}'), box_threshold=1.0)
    samples = [VisualSample("s", _image(), _image())]
    assert asyncio.run(sim.simulate("the beginning of sentences", samples, (6, 6)))[0].sum() == 0
    sim = GroundedSimulator(models, None, phrases="explanation", box_threshold=1.0, text_threshold=1.0)
    assert asyncio.run(sim.simulate("red", samples, (6, 6)))[0].sum() == 0


def test_unparsable_phrases_are_a_typed_failure(models):
    sim = GroundedSimulator(models, FakeLLM("I cannot help with that."))
    with pytest.raises(SimulationFailure) as e:
        asyncio.run(sim.simulate("trains", [VisualSample("s", _image(), _image())], (6, 6)))
    assert e.value.kind is FailureKind.UNPARSABLE
