"""Modality masks against the processor's own output, with left and right padding and
descriptions of different lengths, for the built-in tokenizer (byte-level BPE) and for a
tokenizer built like LLaMA-2's (the paper's model: SentencePiece-style "▁" pieces)."""

from __future__ import annotations

import pytest
import torch

from builder.capture.inputs import encode_batch
from builder.corpus.shapes import shape_sample
from builder.text import teacher_forced_text

PROMPT = "Could you describe the image?"
DESCRIPTIONS = [
    "a red circle",
    "a blue square above a green triangle, and 2 more words: café, naïve!",
    "ok",
    "The image shows an image of <b>tags</b> and  double  spaces.",
]


def llama_style_processor(tiny_processor):
    """A LlavaProcessor whose tokenizer is built like LLaMA's fast tokenizer: words become
    "▁"-prefixed pieces (the space before a word belongs to its first token), BPE with byte
    fallback, BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    from builder.models.builtin import LLAVA_CHAT_TEMPLATE, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS + byte_tokens, show_progress=False)
    tok.train_from_iterator([f"USER: ASSISTANT: {PROMPT} {' '.join(DESCRIPTIONS)}"] * 20, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                        chat_template=LLAVA_CHAT_TEMPLATE)
    return LlavaProcessor(image_processor=tiny_processor.image_processor, tokenizer=tokenizer,
                          patch_size=tiny_processor.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


@pytest.fixture(scope="module", params=["builtin", "llama-style"])
def processor(request: pytest.FixtureRequest, tiny_vlm):
    return tiny_vlm.processor if request.param == "builtin" else llama_style_processor(tiny_vlm.processor)


@pytest.mark.parametrize("side", ["left", "right"])
def test_masks_match_processor_and_description(processor, tiny_vlm, side: str) -> None:
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    images = [shape_sample(i)[0] for i in range(len(DESCRIPTIONS))]
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        batch = encode_batch(processor, images, DESCRIPTIONS, PROMPT, image_token_id, list(range(len(DESCRIPTIONS))))
        # The processor's own output for the same teacher-forced texts.
        texts = [teacher_forced_text(processor, PROMPT, d)[0] for d in DESCRIPTIONS]
        own = processor(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old
    ids = batch.inputs["input_ids"]
    attention = batch.inputs["attention_mask"].bool()
    assert torch.equal(ids, own["input_ids"])
    assert torch.equal(batch.inputs["pixel_values"], own["pixel_values"])
    # Visual: exactly where the processor put the image token, 36 per image (6x6 patches).
    assert torch.equal(batch.visual_mask, own["input_ids"] == image_token_id)
    assert batch.visual_mask.sum(1).tolist() == [36] * len(DESCRIPTIONS)
    # Padding is on the configured side, and the lengths differ.
    lengths = attention.sum(1)
    assert len(set(lengths.tolist())) == len(DESCRIPTIONS)
    shortest = int(lengths.argmin())
    assert not attention[shortest, 0 if side == "left" else -1]
    for row, description in enumerate(DESCRIPTIONS):
        text = batch.text_mask[row]
        positions = text.nonzero().flatten()
        # Text: the masked tokens decode to the description, nothing more, nothing less.
        decoded = tokenizer.decode(ids[row][text])
        assert decoded.removeprefix(" ") == description
        # One contiguous run, attended, disjoint from the image, at the end of the attended tokens.
        assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[-1]) + 1))
        assert attention[row][positions].all()
        assert not (text & batch.visual_mask[row]).any()
        assert int(positions[-1]) == int(attention[row].nonzero().max())
        # Everything else attended is the chat template: BOS, "USER:", the image, the
        # question and "ASSISTANT:"; padding is in no mask.
        rest = attention[row] & ~text & ~batch.visual_mask[row]
        first = int(attention[row].nonzero().min())
        assert int(ids[row, first]) == tokenizer.bos_token_id and rest[first]
        template = tokenizer.decode(ids[row][rest], skip_special_tokens=True)
        assert template.split() == ["USER:", *PROMPT.split(), "ASSISTANT:"]
        assert not (batch.text_mask[row] | batch.visual_mask[row])[~attention[row]].any()


def test_description_mentioning_images_is_text(tiny_vlm) -> None:
    """Only the expanded placeholder is visual; the words 'image' in a description are text."""
    image = shape_sample(0)[0]
    batch = encode_batch(tiny_vlm.processor, [image], ["the image shows an image"], PROMPT, tiny_vlm.image_token_id, [7])
    assert int(batch.visual_mask.sum()) == 36
    assert tiny_vlm.processor.tokenizer.decode(batch.inputs["input_ids"][0][batch.text_mask[0]]).strip() == \
        "the image shows an image"
    assert batch.sample_index.tolist() == [7]


def test_padding_side_argument_overrides_the_tokenizer(tiny_vlm) -> None:
    """Capture asks for right padding whatever the tokenizer is set to; the masks move with it."""
    processor = tiny_vlm.processor
    assert processor.tokenizer.padding_side == "left"
    images = [shape_sample(i)[0] for i in range(2)]
    left = encode_batch(processor, images, DESCRIPTIONS[:2], PROMPT, tiny_vlm.image_token_id, [0, 1])
    right = encode_batch(processor, images, DESCRIPTIONS[:2], PROMPT, tiny_vlm.image_token_id, [0, 1],
                         padding_side="right")
    assert processor.tokenizer.padding_side == "left"
    assert not left.inputs["attention_mask"][0, 0] and not right.inputs["attention_mask"][0, -1]
    for row in range(2):  # the same tokens and masks, only shifted
        on_left, on_right = left.inputs["attention_mask"][row].bool(), right.inputs["attention_mask"][row].bool()
        assert torch.equal(left.inputs["input_ids"][row][on_left], right.inputs["input_ids"][row][on_right])
        for mask in ("visual_mask", "text_mask"):
            assert torch.equal(getattr(left, mask)[row][on_left], getattr(right, mask)[row][on_right])
    # With right padding the image sits at the same positions in every sample.
    visual_rows = right.visual_mask.nonzero()[:, 1].view(2, -1)
    assert torch.equal(visual_rows[0], visual_rows[1])
