"""The `grounded` visual simulator (the paper's, METHOD.md 6): explanation -> phrases ->
boxes -> masks -> per-patch coverage.

1. Phrases: an LLM turns the explanation into a few short grounding phrases
   (`simulate.phrases: llm`), or the explanation itself is the one phrase (`explanation`).
2. Boxes: an open-vocabulary detector (`simulate.detector`, Grounding DINO by default,
   loaded with `AutoModelForZeroShotObjectDetection`) finds the phrases in the VLM's view
   of the image; boxes above `box_threshold` / `text_threshold`, best `max_boxes` kept.
3. Masks: a box-prompted segmenter (`simulate.segmenter`, `AutoModelForMaskGeneration`)
   turns each box into a mask; the prediction is the union of the masks. The default is
   SAM (`facebook/sam-vit-base`); the paper used SAM 2, which loads the same way
   (`facebook/sam2.1-hiera-large`) but whose transformers image processor needs
   torchvision, which a CPU-only install of torch here cannot have, so it is not tested.
4. Patch map: each grid cell's predicted activation is 10 x the fraction of its area the
   union mask covers. No phrase, or no box found, predicts 0 everywhere (a constant
   prediction, which scores 0 by the scoring rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from builder.errors import ModelError
from builder.simulate.base import FailureKind, SimulationFailure, VisualSample
from builder.simulate.grid import patch_coverage
from builder.simulate.llm import Ask, Message
from builder.simulate.parsing import parse_phrases

PHRASES_PROMPT_VERSION = "grounding-phrases/1"
"""Bumped whenever the grounding-phrase prompt changes."""


def phrases_prompt(explanation: str, max_phrases: int) -> list[Message]:
    """The chat messages asking for detector phrases."""
    user = (
        f"An explanation of a vision neuron: this neuron activates for {explanation.strip()}\n\n"
        f"Rewrite it as at most {max_phrases} short noun phrases that an open-vocabulary object "
        'detector can find in an image (for example "train", "railway track", "red car"). '
        'Answer with JSON only: {"phrases": ["...", ...]}; answer {"phrases": []} if the '
        "explanation names nothing visible."
    )
    return [{"role": "user", "content": user}]


@dataclass
class GroundingModels:
    """The detector and the segmenter with their processors, ready for inference."""

    detector: Any
    detector_processor: Any
    segmenter: Any
    segmenter_processor: Any

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device


def load_grounding_models(detector: str, segmenter: str, device: str = "cpu") -> GroundingModels:
    """`from_pretrained` of the recipe's detector and segmenter ids (Hub ids or local folders)."""
    from transformers import AutoModelForMaskGeneration, AutoModelForZeroShotObjectDetection, AutoProcessor

    from builder.models.loading import resolve_device

    dev = resolve_device(device)
    loaded = []
    for key, model_id, auto in (("detector", detector, AutoModelForZeroShotObjectDetection),
                                ("segmenter", segmenter, AutoModelForMaskGeneration)):
        try:
            processor = AutoProcessor.from_pretrained(model_id)
            model = auto.from_pretrained(model_id).to(dev).eval()
        except (OSError, ValueError) as e:
            raise ModelError(
                f"simulate.{key}={model_id!r}: cannot load ({str(e).splitlines()[0]}); give a Hub id reachable "
                "from this machine or a local save_pretrained folder"
            ) from e
        loaded += [model, processor]
    if not hasattr(loaded[3], "post_process_masks"):
        raise ModelError(f"simulate.segmenter={segmenter!r}: not a SAM-style box-prompted segmenter "
                         "(its processor has no post_process_masks); use e.g. facebook/sam-vit-base")
    return GroundingModels(*loaded)


class GroundedSimulator:
    """Phrases -> detector boxes -> segmenter masks -> patch coverage x 10."""

    name: ClassVar[str] = "grounded"

    def __init__(self, models: GroundingModels, ask: Ask | None, phrases: str = "llm", max_phrases: int = 3,
                 box_threshold: float = 0.35, text_threshold: float = 0.25, max_boxes: int = 10):
        if phrases == "llm" and ask is None:
            raise ValueError("phrases='llm' needs an LLM (ask)")
        self.models = models
        self.ask = ask
        self.phrase_source = phrases
        self.max_phrases = max_phrases
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.max_boxes = max_boxes
        self._phrases: dict[str, list[str]] = {}

    async def phrases(self, explanation: str) -> list[str]:
        """The grounding phrases of an explanation (asked once per explanation)."""
        if explanation not in self._phrases:
            if self.phrase_source == "explanation":
                found = [" ".join(explanation.split())]
            else:
                assert self.ask is not None
                answer = await self.ask(phrases_prompt(explanation, self.max_phrases), 32 + 16 * self.max_phrases)
                found = parse_phrases(answer, self.max_phrases)
            self._phrases[explanation] = found
        return self._phrases[explanation]

    @torch.inference_mode()
    def detect(self, image: Image.Image, phrases: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Boxes [n, 4] (x0, y0, x1, y1 in image pixels) and scores [n] of the phrases, best first."""
        m = self.models
        # Grounding DINO's text format: lower-case phrases, each ending with a period.
        text = " ".join(p.lower().rstrip(".") + "." for p in phrases)
        inputs = m.detector_processor(images=image, text=text, return_tensors="pt").to(m.device)
        outputs = m.detector(**inputs)
        result = m.detector_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        scores = result["scores"].float().cpu().numpy()
        boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
        order = np.argsort(-scores, kind="stable")[: self.max_boxes]
        boxes = boxes[order]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image.height)
        return boxes, scores[order]

    @torch.inference_mode()
    def segment(self, image: Image.Image, boxes: np.ndarray) -> np.ndarray:
        """bool [height, width]: the union of the segmenter's masks for the boxes."""
        if len(boxes) == 0:
            return np.zeros((image.height, image.width), dtype=bool)
        m = self.models
        inputs = m.segmenter_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt").to(m.device)
        outputs = m.segmenter(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                              multimask_output=False)
        # SAM's processor also needs the resized input's size; SAM 2's works from the original's.
        sizes = [inputs[k].cpu() for k in ("original_sizes", "reshaped_input_sizes") if k in inputs]
        masks = m.segmenter_processor.post_process_masks(outputs.pred_masks.cpu(), *sizes)[0]  # [n_boxes, 1, h, w]
        return masks.reshape(-1, image.height, image.width).any(0).numpy()

    def predict(self, view: Image.Image, phrases: list[str], grid: tuple[int, int]) -> np.ndarray:
        """[H, W] prediction for one view: 10 x mask coverage of each patch."""
        if not phrases:
            return np.zeros(grid, dtype=np.float32)
        try:
            boxes, _scores = self.detect(view, phrases)
            mask = self.segment(view, boxes)
        except (RuntimeError, ValueError, IndexError) as e:
            raise SimulationFailure(FailureKind.MODEL, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        return (patch_coverage(mask, grid) * 10).astype(np.float32)

    async def simulate(self, explanation: str, samples: list[VisualSample], grid: tuple[int, int]) -> list[np.ndarray]:
        phrases = await self.phrases(explanation)
        return [self.predict(s.view.convert("RGB"), phrases, grid) for s in samples]
