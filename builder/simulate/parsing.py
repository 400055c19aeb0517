"""Reading simulator answers: the JSON inside an LLM's reply, checked value by value.

Models wrap JSON in prose or code fences, quote numbers, or answer a list where an
object was asked for; these readers accept those forms and refuse everything else with a
:class:`SimulationFailure` (never a default value). Numbers are clipped to 0-10: a value
slightly out of scale is still a prediction, a non-number is not.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from builder.simulate.base import FailureKind, SimulationFailure

_DECODER = json.JSONDecoder()


def _excerpt(text: str, n: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 3] + "..."


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text` (the largest one starting at the earliest
    bracket), with code fences and surrounding prose ignored."""
    if not text or not text.strip():
        raise SimulationFailure(FailureKind.UNPARSABLE, "empty answer")
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _end = _DECODER.raw_decode(text, i)
            except json.JSONDecodeError:
                continue
            return value
    raise SimulationFailure(FailureKind.UNPARSABLE, f"no JSON object or array in {_excerpt(text)!r}")


def to_value(x: Any, where: str) -> float:
    """A 0-10 activation from a JSON number or numeric string."""
    if isinstance(x, bool) or x is None:
        raise SimulationFailure(FailureKind.UNPARSABLE, f"{where}: {x!r} is not a number")
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            raise SimulationFailure(FailureKind.UNPARSABLE, f"{where}: {x!r} is not a number") from None
    if not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise SimulationFailure(FailureKind.UNPARSABLE, f"{where}: {x!r} is not a finite number")
    return min(10.0, max(0.0, float(x)))


def _unwrap(value: Any, keys: tuple[str, ...]) -> Any:
    """`{"activations": X}` -> X (also a single-key object of any name)."""
    if isinstance(value, dict):
        for k in keys:
            if k in value:
                return value[k]
        if len(value) == 1:
            only = next(iter(value.values()))
            if isinstance(only, (list, dict)):
                return only
    return value


def _pair_value(item: Any, where: str) -> float:
    """A value from `5`, `"5"`, `["tok", 5]` or `{"token": "tok", "activation": 5}`."""
    if isinstance(item, list) and len(item) == 2:
        return to_value(item[1], where)
    if isinstance(item, dict):
        for k in ("activation", "value", "score", "a"):
            if k in item:
                return to_value(item[k], where)
        raise SimulationFailure(FailureKind.UNPARSABLE, f"{where}: object without an activation: {item!r}")
    return to_value(item, where)


def parse_token_values(text: str, n_tokens: int) -> np.ndarray:
    """One 0-10 value per token from an answer like `{"activations": [0, 0, 8, ...]}`."""
    value = _unwrap(extract_json(text), ("activations", "values", "tokens"))
    if not isinstance(value, list):
        raise SimulationFailure(FailureKind.UNPARSABLE, f"expected a list of {n_tokens} activations, got {_excerpt(text)!r}")
    if len(value) != n_tokens:
        raise SimulationFailure(FailureKind.WRONG_LENGTH, f"{len(value)} activations for {n_tokens} tokens")
    return np.array([_pair_value(v, f"token {i + 1}") for i, v in enumerate(value)], dtype=np.float32)


def parse_cell_values(text: str, rows: int, cols: int) -> np.ndarray:
    """A [rows, cols] 0-10 map from a numbered-grid answer.

    Accepted: `{"activations": {"<cell>": value, ...}}` listing the non-zero cells (cells are
    numbered 1..rows*cols row by row; unlisted cells are 0 because the prompt asks to list
    only non-zero ones), a flat list of rows*cols values, or a list of `rows` rows.
    """
    n = rows * cols
    value = _unwrap(extract_json(text), ("activations", "cells", "values"))
    out = np.zeros(n, dtype=np.float32)
    if isinstance(value, dict):
        for key, v in value.items():
            try:
                cell = int(str(key).strip().lstrip("#"))
            except ValueError:
                raise SimulationFailure(FailureKind.UNPARSABLE, f"cell key {key!r} is not a cell number") from None
            if not 1 <= cell <= n:
                raise SimulationFailure(FailureKind.UNPARSABLE, f"cell {cell} is outside 1..{n}")
            out[cell - 1] = to_value(v, f"cell {cell}")
        return out.reshape(rows, cols)
    if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
        if len(value) != rows or any(len(r) != cols for r in value):
            shape = f"{len(value)} rows of {sorted({len(r) for r in value})}"
            raise SimulationFailure(FailureKind.WRONG_LENGTH, f"{shape} cells for a {rows}x{cols} grid")
        value = [v for r in value for v in r]
    if not isinstance(value, list):
        raise SimulationFailure(FailureKind.UNPARSABLE, f"expected cell activations, got {_excerpt(text)!r}")
    if len(value) != n:
        raise SimulationFailure(FailureKind.WRONG_LENGTH, f"{len(value)} values for {n} grid cells")
    return np.array([to_value(v, f"cell {i + 1}") for i, v in enumerate(value)], dtype=np.float32).reshape(rows, cols)


def parse_phrases(text: str, max_phrases: int) -> list[str]:
    """Grounding phrases from `{"phrases": ["a red car", ...]}` or a bare list of strings
    (deduplicated, at most `max_phrases`; may be empty)."""
    value = _unwrap(extract_json(text), ("phrases", "objects"))
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise SimulationFailure(FailureKind.UNPARSABLE, f"expected a list of phrases, got {_excerpt(text)!r}")
    phrases = []
    for p in value:
        p = " ".join(p.split()).strip(" .")
        if p and p.lower() not in (q.lower() for q in phrases):
            phrases.append(p)
    # An empty list is an answer: the explanation names nothing visible, so nothing is found.
    return phrases[:max_phrases]
