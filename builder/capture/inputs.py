"""Teacher-forced model inputs and the modality masks of every position.

visual = the image-token positions the processor expanded (`input_ids == image_token_id`),
exactly where the model writes image features (for LLaVA-NeXT: the base view, the anyres
tiles and their row-newline tokens, a count that varies per image; the fixed heatmap grid
among them is `builder.models.layout`);
text = the tokens of the description only: chat-template tokens (BOS, "USER:", the
question, "ASSISTANT:") and padding are in neither mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from builder.text import teacher_forced_text


@dataclass
class ModelBatch:
    """One forward pass worth of samples."""

    inputs: dict[str, torch.Tensor]
    """What the model's forward takes (input_ids, attention_mask, pixel_values, ...)."""
    visual_mask: torch.Tensor
    """bool [batch, seq]: image-patch positions."""
    text_mask: torch.Tensor
    """bool [batch, seq]: description-token positions."""
    sample_index: torch.Tensor
    """int64 [batch]: index of each sample in samples.parquet."""


def encode_batch(
    processor: Any,
    images: list[Image.Image],
    descriptions: list[str],
    prompt: str,
    image_token_id: int,
    sample_index: list[int],
    device: Any = "cpu",
    padding_side: str | None = None,
) -> ModelBatch:
    """Build the teacher-forced inputs `<prompt with image> <description>` and their masks.

    padding_side: `left` or `right`, or None for the tokenizer's own setting.
    """
    texts, starts = zip(*(teacher_forced_text(processor, prompt, d) for d in descriptions))
    side = {"padding_side": padding_side} if padding_side else {}
    enc = processor(
        images=list(images),
        text=list(texts),
        return_tensors="pt",
        padding=True,
        return_offsets_mapping=True,
        **side,
    )
    offsets = enc.pop("offset_mapping")  # [B, T, 2] char spans in the image-expanded text
    input_ids = enc["input_ids"]
    attention = enc["attention_mask"].bool()
    visual = (input_ids == image_token_id) & attention
    image_token = getattr(processor, "image_token", "<image>")
    # The description follows the image placeholder, so its start moves right by the
    # characters the processor added when it expanded the placeholder.
    n_image = visual.sum(dim=1)
    n_placeholders = torch.tensor([t[:s].count(image_token) for t, s in zip(texts, starts)])
    shift = (n_image - n_placeholders) * len(image_token)
    start = torch.tensor(starts) + shift
    tok_start, tok_end = offsets[..., 0], offsets[..., 1]
    text = attention & ~visual & (tok_end > tok_start) & (tok_end > start[:, None]) & (tok_start >= start[:, None] - 1)
    return ModelBatch(
        inputs={k: v.to(device) for k, v in enc.items()},
        visual_mask=visual.to(device),
        text_mask=text.to(device),
        sample_index=torch.tensor(sample_index, dtype=torch.int64, device=device),
    )
