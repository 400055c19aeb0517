"""Reading the phrase out of an explainer's answer, or saying why there is none.

Accepted: the phrase alone, or wrapped in quotes, markdown, a code fence, a JSON object
with one string value, a leading "This neuron activates for", "Explanation:" or "...",
with a trailing full stop. Refused: blank answers (`empty`), refusals (`refusal`), and
anything that is not a short phrase (`unparsable`).
"""

from __future__ import annotations

import json
import re

from builder.llm.types import FailureKind, LLMFailure

MAX_CHARS = 300
"""Longer answers are not the short phrase asked for."""

REFUSAL = re.compile(
    r"^(i'?m sorry|i am sorry|sorry[,.!]|i can'?t\b|i cannot\b|i'?m unable|i am unable|i'?m not able|"
    r"i am not able|i won'?t\b|as an ai\b)",
    re.IGNORECASE,
)
PREFIX = re.compile(
    r"^(?:(?:this|the) neuron (?:activates|fires|responds|is active)\s*(?:for|on|to|when)?\b|activates for\b|"
    r"explanation\s*:|answer\s*:|phrase\s*:)\s*",
    re.IGNORECASE,
)
WRAP = "\"'`*_“”‘’ "


def _unwrap(s: str) -> str:
    s = s.strip()
    s = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", s)  # a list bullet
    s = s.strip(WRAP)
    s = re.sub(r"^(?:\.\.\.|…)\s*", "", s)
    return s.strip(WRAP)


def parse_explanation(text: str) -> str:
    """The phrase completing "this neuron activates for ..."; raises LLMFailure otherwise."""
    raw = (text or "").strip()
    if not raw:
        raise LLMFailure(FailureKind.EMPTY, "blank answer")
    body = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", raw).strip()
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            values = [v for v in obj.values() if isinstance(v, str) and v.strip()]
            if len(values) == 1:
                body = values[0]
    lines = [ln for ln in (x.strip() for x in body.splitlines()) if ln]
    if not lines:
        raise LLMFailure(FailureKind.EMPTY, "blank answer")
    line = _unwrap(lines[0])
    if REFUSAL.match(line):
        raise LLMFailure(FailureKind.REFUSAL, line[:200])
    for _ in range(2):  # "Explanation: This neuron activates for ..." has two prefixes
        line = _unwrap(PREFIX.sub("", line))
    line = re.sub(r"\s+", " ", line).rstrip(" .").strip(WRAP).strip()
    if not re.search(r"[^\W_]", line):
        raise LLMFailure(FailureKind.UNPARSABLE, f"no phrase in the answer: {raw[:120]!r}")
    if len(line) > MAX_CHARS:
        raise LLMFailure(FailureKind.UNPARSABLE, f"not a short phrase ({len(line)} characters): {raw[:120]!r}")
    return line
