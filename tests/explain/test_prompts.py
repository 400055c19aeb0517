"""Golden prompts (exact text per category) and the answer parser."""

from __future__ import annotations

import pytest

from builder.config import ExplainConfig
from builder.explain.parse import parse_explanation
from builder.explain.prompts import PROMPT_VERSION, explain_messages, explain_request
from builder.explain.records import Exemplar, NeuronExemplars
from builder.llm.types import FailureKind, LLMFailure

PNG = b"\x89PNG\r\n\x1a\nfake"
JPEG = b"\xff\xd8\xffjpeg"
EXEMPLARS = (
    Exemplar("s1", 0, PNG, (" a", " red", " circle"), (0.2, 9.6, 3.4)),
    Exemplar("s2", 2, JPEG, (" red", " sky"), (10.0, 0.0)),
)

SYSTEM = (
    "You are explaining one neuron in the language model of a vision-language model. Its activation is given "
    "on a 0-10 scale, where 10 is its highest activation over the whole dataset. You are shown the examples on "
    "which it activates most, and you describe in a short phrase what makes it activate."
)
QUESTION = (
    'Complete the sentence "This neuron activates for ..." with a short phrase of at most 15 words, for example '
    '"the presence of a train or train-related elements" or "words related to airplanes and airports". Answer '
    "with the phrase only."
)
PNG_URL = "data:image/png;base64,iVBORw0KGgpmYWtl"
JPEG_URL = "data:image/jpeg;base64,/9j/anBlZw=="


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


GOLDEN = {
    "visual": [
        text(
            "Here are the 2 images on which the neuron activates most. Each image is faded to white where the neuron "
            "is inactive: the parts that keep their colour are where it activates, and the more colour, the stronger "
            "the activation. Look at what the coloured parts have in common."
        ),
        text("Image 1:"),
        image(PNG_URL),
        text("Image 2:"),
        image(JPEG_URL),
        text(QUESTION),
    ],
    "text": (
        "Here are the 2 image descriptions on which the neuron activates most. Each is given one token per line, the "
        "token as a JSON string (so that spaces show), a tab, and the neuron's activation on it (0-10). Look at what "
        "the high-activation tokens have in common.\n\n"
        'Description 1:\n" a"\t0\n" red"\t10\n" circle"\t3\n\n'
        'Description 2:\n" red"\t10\n" sky"\t0\n\n' + QUESTION
    ),
    "multimodal": [
        text(
            "Here are the 2 examples on which the neuron activates most, each an image and its description. The "
            "neuron activates on parts of the image and on tokens of the description. Each image is faded to white "
            "where the neuron is inactive: the parts that keep their colour are where it activates. Each description "
            "is given one token per line, the token as a JSON string, a tab, and the neuron's activation on it "
            "(0-10). Look at what the coloured image parts and the high-activation tokens have in common."
        ),
        text("Example 1, image:"),
        image(PNG_URL),
        text('Example 1, description:\n" a"\t0\n" red"\t10\n" circle"\t3'),
        text("Example 2, image:"),
        image(JPEG_URL),
        text('Example 2, description:\n" red"\t10\n" sky"\t0'),
        text(QUESTION),
    ],
}


@pytest.mark.parametrize("category", ["visual", "text", "multimodal"])
def test_golden_prompt(category):
    """A change here changes what the LLM is asked: bump PROMPT_VERSION with it."""
    assert PROMPT_VERSION == "explain-v1"
    system, user = explain_messages(NeuronExemplars(1, 7, category, EXEMPLARS), "low")
    assert system == {"role": "system", "content": SYSTEM}
    assert user == {"role": "user", "content": GOLDEN[category]}


def test_request_carries_recipe_parameters():
    cfg = ExplainConfig(model="gpt-4o-mini", max_tokens=40, temperature=0.3, image_detail="high")
    req = explain_request(NeuronExemplars(0, 0, "visual", EXEMPLARS), cfg)
    body = req.body()
    assert body["model"] == "gpt-4o-mini" and body["max_tokens"] == 40 and body["temperature"] == 0.3
    assert body["messages"][1]["content"][2]["image_url"]["detail"] == "high"
    assert req.key == explain_request(NeuronExemplars(5, 9, "visual", EXEMPLARS), cfg).key  # no neuron id leaks in


def test_unknown_category_has_no_prompt():
    with pytest.raises(ValueError, match="unknown"):
        explain_messages(NeuronExemplars(0, 0, "unknown", EXEMPLARS), "low")


@pytest.mark.parametrize(
    "answer, phrase",
    [
        ("the presence of a train", "the presence of a train"),
        ("  The colour red.\n", "The colour red"),
        ('"words related to airplanes and airports"', "words related to airplanes and airports"),
        ("This neuron activates for the beginning of sentences.", "the beginning of sentences"),
        ("Explanation: this neuron activates for **red objects**", "red objects"),
        ("... cats and dogs", "cats and dogs"),
        ("```\nstriped textures\n```", "striped textures"),
        ('{"explanation": "water surfaces"}', "water surfaces"),
        ("- vertical edges\n- more text that is ignored", "vertical edges"),
        ("“round shapes”", "round shapes"),
    ],
)
def test_parser_reads_the_phrase(answer, phrase):
    assert parse_explanation(answer) == phrase


@pytest.mark.parametrize(
    "answer, kind",
    [
        ("", FailureKind.EMPTY),
        ("   \n ", FailureKind.EMPTY),
        ("I'm sorry, but I can't help with that.", FailureKind.REFUSAL),
        ("I cannot determine a pattern from these images.", FailureKind.REFUSAL),
        ("...!?", FailureKind.UNPARSABLE),
        ("This neuron activates for ...", FailureKind.UNPARSABLE),
        ("word " * 80, FailureKind.UNPARSABLE),
    ],
)
def test_parser_types_its_failures(answer, kind):
    with pytest.raises(LLMFailure) as err:
        parse_explanation(answer)
    assert err.value.kind is kind
