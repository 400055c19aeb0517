"""Built-in test models, made in process with no network.

`builtin:tiny-llava` is a `LlavaForConditionalGeneration` with a tiny CLIP vision tower
and a tiny LLaMA language model, a byte-level BPE tokenizer trained in process and a
`LlavaProcessor`, all deterministic from a seed. It is saved with `save_pretrained` into
the cache folder and always loaded back with the same `from_pretrained` code the real
recipe uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from builder.io import stable_hash

# Words the tokenizer is trained on: the chat template, the prompt, and the vocabulary of
# the built-in shapes corpus, so that these words become single tokens.
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle"]
RELATIONS = ["above", "below", "left of", "right of", "next to"]
TEMPLATE_WORDS = "USER: ASSISTANT: Could you describe the image? What is in this picture? a an the and with of on"

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5's conversation format: "USER: <image>\n{prompt} ASSISTANT: {answer}</s>".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Shape of the built-in tiny LLaVA."""

    image_size: int = 48
    """Square input resolution of the CLIP tower."""
    patch_size: int = 8
    """CLIP patch size: the image-token grid is (image_size / patch_size)^2 (6x6 = 36)."""
    vision_hidden: int = 32
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 4
    intermediate: int = 96
    """FFN neurons per language-model layer."""
    heads: int = 4
    vocab_size: int = 400
    seed: int = 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def cache_root() -> Path:
    """Where built-in models are saved: `$BUILDER_CACHE` or `~/.cache/build-neuron-dataset`."""
    return Path(os.environ.get("BUILDER_CACHE", Path.home() / ".cache" / "build-neuron-dataset"))


def build_tokenizer(spec: TinyLlavaSpec):
    """A byte-level BPE tokenizer trained in process; any text encodes, shapes words are whole tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    phrases = [TEMPLATE_WORDS] + [f"a {c} {s}" for c in COLOURS for s in SHAPES] + RELATIONS
    tok.train_from_iterator(phrases * 20, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def tiny_backbone_configs(spec: TinyLlavaSpec, tokenizer):
    """The tiny CLIP vision tower and LLaMA language model configs shared by the built-in VLMs."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads // 2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return vision, text


def llava_config_kwargs(spec: TinyLlavaSpec, tokenizer) -> dict:
    """Config arguments shared by the tiny LLaVA families: tiny towers, LLaVA-1.5's feature choice."""
    vision, text = tiny_backbone_configs(spec, tokenizer)
    return {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "image_seq_length": spec.grid**2,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
    }


def llava_processor_kwargs(spec: TinyLlavaSpec, tokenizer) -> dict:
    """Processor arguments shared by the tiny LLaVA families (one CLS feature dropped)."""
    return {
        "tokenizer": tokenizer,
        "patch_size": spec.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": LLAVA_CHAT_TEMPLATE,
    }


def seeded_model(model_class, config, tokenizer, seed: int):
    """`model_class(config)` with random weights from `seed`, generating with the tokenizer's ids."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_llava(spec: TinyLlavaSpec):
    """Model and processor of the tiny LLaVA, random weights from `spec.seed`."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer(spec)
    config = LlavaConfig(**llava_config_kwargs(spec, tokenizer))
    model = seeded_model(LlavaForConditionalGeneration, config, tokenizer, spec.seed)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(image_processor=image_processor, **llava_processor_kwargs(spec, tokenizer))
    return model, processor


BUILDERS = {"tiny-llava": build_tiny_llava}
"""Built-in model names (after `builtin:`) and the function that makes each."""


BUILTIN_MODULES = ("builder.models.llava_next", "builder.models.planted")
"""Modules that call `register_builtin` when imported (other model families)."""


def register_builtin(name: str, builder) -> None:
    BUILDERS[name] = builder


def materialize_builtin(name: str, seed: int = 0, root: Path | None = None) -> Path:
    """Save the built-in model `name` with `save_pretrained` (once) and return its folder."""
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    if name not in BUILDERS:
        from builder.errors import ModelError

        raise ModelError(f"unknown built-in model 'builtin:{name}'; built-ins: {', '.join('builtin:' + n for n in BUILDERS)}")
    spec = TinyLlavaSpec(seed=seed)
    folder = (root or cache_root()) / "models" / f"{name}-{stable_hash([name, spec.__dict__, BUILD_VERSION])}"
    if (folder / ".complete").exists():
        return folder
    model, processor = BUILDERS[name](spec)
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


BUILD_VERSION = 1
"""Bumped when a built-in model's construction changes, so cached folders are rebuilt."""
