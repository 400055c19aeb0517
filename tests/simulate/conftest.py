"""Fixtures of the simulator tests: tiny Grounding DINO and SAM made from configs in process
(random weights), saved with save_pretrained so the real from_pretrained loading runs."""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "circle", "square", "train", "the", "of"]


def tiny_grounding_dino():
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    backbone = SwinConfig(image_size=128, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    # decoder_layers >= 2: the box heads of the decoder layers are tied to the first one.
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=20, max_text_len=32, encoder_n_points=2,
                                 decoder_n_points=2)
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 128}),
        tokenizer=tokenizer,
    )
    return model, processor


def tiny_sam():
    import torch
    from transformers import (
        SamConfig,
        SamImageProcessorPil,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_channels=16,
                             image_size=64, patch_size=8, mlp_dim=64, global_attn_indexes=[0], window_size=4,
                             num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(0)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).eval()
    processor = SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": 64},
                                                                  pad_size={"height": 64, "width": 64}))
    return model, processor


@pytest.fixture(scope="session")
def grounding_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(detector folder, segmenter folder) saved with save_pretrained."""
    root = tmp_path_factory.mktemp("grounding")
    out = []
    for name, build in (("grounding-dino", tiny_grounding_dino), ("sam", tiny_sam)):
        model, processor = build()
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        out.append(root / name)
    return out[0], out[1]


@pytest.fixture(scope="session")
def simulated_run(builder_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`--recipe tiny` (planted model, offline explainer, offline simulators) up to and
    including the simulate stage (shared, read-only: copy it before changing it)."""
    from builder.config import load_recipe
    from builder.pipeline import default_stages
    from builder.run import Executor

    out = tmp_path_factory.mktemp("simulated-run")
    Executor(load_recipe("tiny"), out, default_stages()).run(until="simulate")
    return out
