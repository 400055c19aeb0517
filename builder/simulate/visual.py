"""Visual simulators other than `grounded`: the vision-LLM grid reader and the offline baseline.

- `llm`: a vision LLM sees the image (the VLM's view of it) with a numbered
  `simulate.llm_grid` x `llm_grid` grid drawn on it and answers the activation of every
  non-zero cell as JSON; each patch takes the value of the cell its centre falls in.
- `offline` (a baseline, labelled so in the data): no external model. The explanation's
  content words are embedded with the VLM's own input-embedding table, every image token
  of the sample by the VLM itself (its input embedding, i.e. the projector's output, the
  space the embedding table lives in), and a patch's prediction is
  `10 * max(0, max over words of cosine(word, patch))`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import torch

from builder.models.layout import ImageLayout
from builder.simulate.base import VisualSample
from builder.simulate.grid import cell_to_patch_map, draw_numbered_grid
from builder.simulate.llm import Ask, Message, image_part
from builder.simulate.parsing import parse_cell_values
from builder.simulate.words import content_words

VISUAL_PROMPT_VERSION = "visual-sim/1"
"""Bumped whenever the vision-LLM simulator's prompt changes."""

VISUAL_SYSTEM = (
    "You simulate one neuron of a vision-language model. You are given an explanation of what "
    "the neuron activates for and an image divided into numbered grid cells. Predict the "
    "neuron's activation in every cell, from 0 (none) to 10 (its strongest): high where the "
    "image shows what the explanation describes, 0 elsewhere."
)


def visual_prompt(explanation: str, image: dict[str, Any], cells: int) -> list[Message]:
    """The chat messages showing the gridded image (an `image_part`) and asking for the
    non-zero cells."""
    n = cells * cells
    text = (
        f"Explanation: this neuron activates for {explanation.strip()}\n\n"
        f"The image is divided into a {cells}x{cells} grid; cells are numbered 1 to {n} row by row, "
        "left to right, top to bottom (the number is in each cell's top-left corner).\n"
        'Answer with JSON only: {"activations": {"<cell number>": <integer 1-10>, ...}} listing only '
        'the cells with a non-zero activation; answer {"activations": {}} if none.'
    )
    return [
        {"role": "system", "content": VISUAL_SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": text}, image]},
    ]


def visual_max_tokens(cells: int) -> int:
    """Answer budget: about six tokens per listed cell (`"12": 7, `), every cell listed at worst."""
    return 32 + 6 * cells * cells


class LLMGridSimulator:
    """A vision LLM reads a numbered grid (one call per image, cached by the call layer)."""

    name: ClassVar[str] = "llm"

    def __init__(self, ask: Ask, cells: int = 8, detail: str = "low", cache_size: int = 256):
        self.ask = ask
        self.cells = cells
        self.detail = detail
        self.cache_size = cache_size
        self._images: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def gridded(self, sample: VisualSample) -> dict[str, Any]:
        """The sample's view with the numbered grid, encoded once per sample (a neuron's
        samples are shown again with the baseline's explanation)."""
        if sample.sample_id not in self._images:
            self._images[sample.sample_id] = image_part(draw_numbered_grid(sample.view, self.cells), self.detail)
            while len(self._images) > self.cache_size:
                self._images.popitem(last=False)
        return self._images[sample.sample_id]

    async def simulate(self, explanation: str, samples: list[VisualSample], grid: tuple[int, int]) -> list[np.ndarray]:
        async def one(s: VisualSample) -> np.ndarray:
            answer = await self.ask(visual_prompt(explanation, self.gridded(s), self.cells), visual_max_tokens(self.cells))
            return cell_to_patch_map(parse_cell_values(answer, self.cells, self.cells), grid)

        # All samples at once: the call layer bounds the requests in flight.
        return list(await asyncio.gather(*(one(s) for s in samples)))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needed was seen."""


def first_layer_input(vlm: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, seq, hidden]: what the first decoder layer receives, i.e. the input embeddings
    with the image features merged in at the image positions. The forward stops there."""
    first_mlp = vlm.mlps()[0].module
    layer = next(m for _, m in vlm.model.named_modules() if getattr(m, "mlp", None) is first_mlp)
    seen: dict[str, torch.Tensor] = {}

    def grab(_module: Any, args: tuple, kwargs: dict) -> None:
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        getattr(vlm.model, "model", vlm.model)(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["hidden"]


class EmbeddingSimilaritySimulator:
    """Baseline: cosine similarity of the explanation's words and the image tokens in the VLM."""

    name: ClassVar[str] = "offline"

    def __init__(self, vlm: Any, layout: ImageLayout, prompt: str, cache_size: int = 512):
        self.vlm = vlm
        self.layout = layout
        self.prompt = prompt
        self.cache_size = cache_size
        self._features: OrderedDict[str, np.ndarray] = OrderedDict()

    @torch.inference_mode()
    def word_vectors(self, words: list[str]) -> torch.Tensor:
        """[n_words, hidden]: each word's tokens (after a space, as in running text) averaged."""
        tok = self.vlm.processor.tokenizer
        table = self.vlm.model.get_input_embeddings().weight
        rows = []
        for w in words:
            ids = tok(" " + w, add_special_tokens=False)["input_ids"]
            rows.append(table[torch.tensor(ids, device=table.device)].float().mean(0))
        return torch.stack(rows)

    @torch.inference_mode()
    def patch_features(self, samples: list[VisualSample]) -> list[np.ndarray]:
        """float32 [H*W, hidden] per sample: the image tokens' input embeddings in grid order,
        unit-normalised (cached per sample)."""
        from builder.capture.inputs import encode_batch

        missing = [s for s in samples if s.sample_id not in self._features]
        if missing:
            vlm = self.vlm
            batch = encode_batch(vlm.processor, [s.image for s in missing], [""] * len(missing), self.prompt,
                                 vlm.image_token_id, list(range(len(missing))), device=vlm.device)
            hidden = first_layer_input(vlm, batch.inputs)
            for i, s in enumerate(missing):
                visual = hidden[i][batch.visual_mask[i]].float()  # [n_visual, hidden] in sequence order
                grid_rows = self.layout.grid_indices(visual.shape[0]).to(visual.device)
                grid_feats = torch.nn.functional.normalize(visual.index_select(0, grid_rows), dim=-1)
                self._features[s.sample_id] = grid_feats.cpu().numpy()
                while len(self._features) > self.cache_size:
                    self._features.popitem(last=False)
        return [self._features[s.sample_id] for s in samples]

    async def simulate(self, explanation: str, samples: list[VisualSample], grid: tuple[int, int]) -> list[np.ndarray]:
        words = content_words(explanation)
        if not words:  # nothing to look for: a constant (uninformative) prediction
            return [np.zeros(grid, dtype=np.float32) for _ in samples]
        vectors = torch.nn.functional.normalize(self.word_vectors(words), dim=-1).cpu().numpy()
        out = []
        for feats in self.patch_features(samples):
            cosine = feats @ vectors.T  # [H*W, n_words]
            out.append((np.clip(cosine.max(-1), 0, None) * 10).reshape(grid).astype(np.float32))
        return out
