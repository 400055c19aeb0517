"""Modality masks against the processor's own output, with left and right padding."""

from __future__ import annotations

import pytest
import torch

from builder.capture.inputs import encode_batch
from builder.corpus.shapes import shape_sample

PROMPT = "Could you describe the image?"


@pytest.mark.parametrize("side", ["left", "right"])
def test_masks_match_processor_and_description(tiny_vlm, side: str) -> None:
    processor = tiny_vlm.processor
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        images = [shape_sample(i)[0] for i in range(3)]
        descriptions = ["a red circle", "a blue square above a green triangle and more words here", "ok"]
        batch = encode_batch(processor, images, descriptions, PROMPT, tiny_vlm.image_token_id, [0, 1, 2])
    finally:
        processor.tokenizer.padding_side = old
    ids = batch.inputs["input_ids"]
    attention = batch.inputs["attention_mask"].bool()
    # Visual: exactly the processor's expanded image-token positions.
    assert torch.equal(batch.visual_mask, (ids == tiny_vlm.image_token_id) & attention)
    assert batch.visual_mask.sum(1).tolist() == [36, 36, 36]
    # Text: decodes to the description and nothing else (no template, BOS or padding).
    for row, description in enumerate(descriptions):
        text_ids = ids[row][batch.text_mask[row]]
        assert processor.tokenizer.decode(text_ids).strip() == description
        positions = batch.text_mask[row].nonzero().flatten()
        # Contiguous, and for right padding followed only by padding.
        assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[-1]) + 1))
        assert not (batch.text_mask[row] & batch.visual_mask[row]).any()
        assert attention[row][positions].all()
        prefix_ids = ids[row][: int(positions[0])][attention[row][: int(positions[0])]]
        prefix = processor.tokenizer.decode(prefix_ids)
        assert "ASSISTANT:" in prefix and PROMPT in prefix
    # Padding sits on the configured side.
    lengths = attention.sum(1)
    shortest = int(lengths.argmin())
    pad_at = 0 if side == "left" else -1
    assert not attention[shortest, pad_at]


def test_description_with_image_token_text_is_not_visual(tiny_vlm) -> None:
    """A description mentioning 'image' words stays text; only expanded placeholders are visual."""
    image = shape_sample(0)[0]
    batch = encode_batch(tiny_vlm.processor, [image], ["the image shows an image"], PROMPT, tiny_vlm.image_token_id, [7])
    assert int(batch.visual_mask.sum()) == 36
    assert tiny_vlm.processor.tokenizer.decode(batch.inputs["input_ids"][0][batch.text_mask[0]]).strip() == \
        "the image shows an image"
    assert batch.sample_index.tolist() == [7]
