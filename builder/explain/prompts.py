"""The explainer's prompts, one per category, versioned.

Any change to the text below changes what the LLM is asked: bump PROMPT_VERSION (it is
stored with every explanation and part of the explain stage's fingerprint). The golden
tests in tests/explain/test_prompts.py hold the exact text.

- visual: the shown exemplars' activation-modulated images (base64 data URLs);
- text: each shown description as token / activation lines;
- multimodal: both, per exemplar.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from builder.config import ExplainConfig
from builder.explain.records import NeuronExemplars
from builder.llm.types import Request

PROMPT_VERSION = "explain-v1"

SYSTEM = (
    "You are explaining one neuron in the language model of a vision-language model. Its activation is given "
    "on a 0-10 scale, where 10 is its highest activation over the whole dataset. You are shown the examples on "
    "which it activates most, and you describe in a short phrase what makes it activate."
)

INTRO = {
    "visual": (
        "Here are the {k} images on which the neuron activates most. Each image is faded to white where the "
        "neuron is inactive: the parts that keep their colour are where it activates, and the more colour, the "
        "stronger the activation. Look at what the coloured parts have in common."
    ),
    "text": (
        "Here are the {k} image descriptions on which the neuron activates most. Each is given one token per line, "
        "the token as a JSON string (so that spaces show), a tab, and the neuron's activation on it (0-10). Look "
        "at what the high-activation tokens have in common."
    ),
    "multimodal": (
        "Here are the {k} examples on which the neuron activates most, each an image and its description. The "
        "neuron activates on parts of the image and on tokens of the description. Each image is faded to white "
        "where the neuron is inactive: the parts that keep their colour are where it activates. Each description "
        "is given one token per line, the token as a JSON string, a tab, and the neuron's activation on it "
        "(0-10). Look at what the coloured image parts and the high-activation tokens have in common."
    ),
}

QUESTION = (
    'Complete the sentence "This neuron activates for ..." with a short phrase of at most 15 words, for '
    'example "the presence of a train or train-related elements" or "words related to airplanes and '
    'airports". Answer with the phrase only.'
)


def image_data_url(data: bytes) -> str:
    """A base64 data URL, its media type read from the bytes' signature."""
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def token_lines(tokens: tuple[str, ...], activations: tuple[float, ...]) -> str:
    """`"token"<TAB>activation` per line, activations rounded to integers."""
    quote = json.encoder.encode_basestring  # json.dumps(t, ensure_ascii=False) for a str, without its setup cost
    return "\n".join(f"{quote(t)}\t{int(round(float(a)))}" for t, a in zip(tokens, activations))


def explain_messages(neuron: NeuronExemplars, detail: str) -> tuple[dict[str, Any], ...]:
    """The chat messages asking for `neuron`'s explanation."""
    category = neuron.category
    if category not in INTRO:
        raise ValueError(f"no explainer prompt for category {category!r}")
    show_images = category in ("visual", "multimodal")
    show_tokens = category in ("text", "multimodal")
    parts: list[dict[str, Any]] = [{"type": "text", "text": INTRO[category].format(k=len(neuron.exemplars))}]
    for i, ex in enumerate(neuron.exemplars, 1):
        label = {"visual": "Image", "text": "Description", "multimodal": "Example"}[category]
        if show_images:
            parts.append({"type": "text", "text": f"{label} {i}:" if category == "visual" else f"{label} {i}, image:"})
            parts.append({"type": "image_url", "image_url": {"url": image_data_url(ex.image), "detail": detail}})
        if show_tokens:
            head = f"{label} {i}:" if category == "text" else f"{label} {i}, description:"
            parts.append({"type": "text", "text": f"{head}\n{token_lines(ex.tokens, ex.activations)}"})
    parts.append({"type": "text", "text": QUESTION})
    if not show_images:
        # Plain string content: text-only servers and models accept it everywhere.
        content: Any = "\n\n".join(p["text"] for p in parts)
    else:
        content = parts
    return ({"role": "system", "content": SYSTEM}, {"role": "user", "content": content})


def explain_request(neuron: NeuronExemplars, cfg: ExplainConfig) -> Request:
    return Request(
        model=cfg.model,
        messages=explain_messages(neuron, cfg.image_detail),
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
    )
