"""The simulators' one way to an LLM: a prompt in, the answer's text out, through builder/llm.

Simulators depend only on :data:`Ask`, so tests can hand them a fake; the stage builds the
real one over the explain stage's call layer (cache, retries, typed failures, cost ledger,
budget). A call-layer failure becomes a :class:`SimulationFailure` of kind `llm`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image

Message = dict[str, Any]
"""An OpenAI-style chat message: `{"role": ..., "content": str | [parts]}`."""

Ask = Callable[[list[Message], int], Awaitable[str]]
"""`await ask(messages, max_tokens)` -> the answer's text; raises SimulationFailure."""


def image_part(image: Image.Image, detail: str = "low", quality: int = 90) -> dict[str, Any]:
    """An `image_url` content part holding the image as a JPEG data URL (fast to encode,
    small to send; the grid's lines and numbers stay legible at quality 90)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def client_ask(client: Any, model: str) -> Ask:
    """An :data:`Ask` over a builder/llm `Client` (greedy decoding; failures typed)."""
    from builder.llm.types import LLMFailure, Request
    from builder.simulate.base import FailureKind, SimulationFailure

    async def ask(messages: list[Message], max_tokens: int) -> str:
        request = Request(model=model, messages=tuple(messages), max_tokens=max_tokens, temperature=0.0)
        try:
            response = await client.complete(request)
        except LLMFailure as e:
            raise SimulationFailure(FailureKind.LLM, str(e)) from e
        return response.text

    return ask
