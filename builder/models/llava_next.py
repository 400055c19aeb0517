"""`builtin:tiny-llava-next`: a tiny LLaVA-NeXT (LLaVA-1.6) made in process.

The second model family the builder supports, with the same tiny CLIP tower, LLaMA
language model, tokenizer and chat template as `builtin:tiny-llava` (the vicuna variant
of LLaVA-NeXT uses LLaVA-1.5's conversation format), but with LLaVA-NeXT's "anyres" image
handling: the image is seen once at the base resolution and again as a grid of
base-resolution tiles chosen from `image_grid_pinpoints` by its size and aspect ratio, and
the tiles' features (cropped back to the image's aspect ratio) carry one learned
`image_newline` token at the end of every row. The number of image tokens therefore
differs per image; `builder.models.layout` maps them back to a fixed patch grid.
"""

from __future__ import annotations

from builder.models.builtin import (
    TinyLlavaSpec,
    build_tokenizer,
    llava_config_kwargs,
    llava_processor_kwargs,
    register_builtin,
    seeded_model,
)


def grid_pinpoints(spec: TinyLlavaSpec) -> list[list[int]]:
    """LLaVA-NeXT's tile layouts (1x2, 2x1, 2x2, 1x3, 3x1 tiles, as (height, width) pixels)
    scaled to the tiny tower's resolution."""
    s = spec.image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def build_tiny_llava_next(spec: TinyLlavaSpec):
    """Model and processor of the tiny LLaVA-NeXT, random weights from `spec.seed`."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = build_tokenizer(spec)
    pinpoints = grid_pinpoints(spec)
    config = LlavaNextConfig(**llava_config_kwargs(spec, tokenizer), image_grid_pinpoints=pinpoints)
    model = seeded_model(LlavaNextForConditionalGeneration, config, tokenizer, spec.seed)
    # The PIL image processor: the same preprocessing whether or not torchvision is installed.
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, **llava_processor_kwargs(spec, tokenizer))
    return model, processor


register_builtin("tiny-llava-next", build_tiny_llava_next)
