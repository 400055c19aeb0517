"""The records and the one interface of the LLM call layer.

Every caller (the explainers now, the simulators later) talks to a :class:`Client`:
`await client.complete(request)` returns a :class:`Response` or raises :class:`LLMFailure`
with a :class:`FailureKind`. A failure is never returned as text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from enum import Enum
from typing import Any, Protocol


class FailureKind(str, Enum):
    """Why a request produced no usable answer."""

    REFUSAL = "refusal"
    """The model declined (the API's `refusal` field, or an answer that is a refusal)."""
    UNPARSABLE = "unparsable"
    """The answer is not in the form the caller asked for."""
    EMPTY = "empty"
    """No answer: empty `choices` or empty message content."""
    CONTENT_FILTER = "content_filter"
    """The provider's content filter stopped the answer (finish_reason or HTTP 400 code)."""
    RETRIES_EXHAUSTED = "retries_exhausted"
    """Retryable errors (429, 408, 409, 5xx, timeouts, connection, malformed body) on every attempt."""
    HTTP_ERROR = "http_error"
    """A non-retryable HTTP error (400, 401, 403, 404, 422, ...)."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """Not sent: its worst-case cost would have taken the spend past the budget cap."""


TERMINAL_KINDS = frozenset({FailureKind.REFUSAL, FailureKind.EMPTY, FailureKind.CONTENT_FILTER, FailureKind.HTTP_ERROR})
"""Failures that the same request would meet again: remembered in the cache, so a rerun does
not pay for them twice (unless `explain.retry_failed`). The others are retried on a rerun."""


class LLMFailure(Exception):
    """A typed failure; `str()` is `kind: detail` (what the per-neuron `failure` column holds)."""

    def __init__(self, kind: FailureKind, detail: str = "", usage: Usage | None = None, cached: bool = False):
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.detail = detail
        self.usage = usage
        """Tokens the failed answer cost (a refusal is billed), when the server reported them."""
        self.cached = cached
        """Replayed from the cache: no request was sent."""


class TransientError(Exception):
    """One attempt failed in a way that a later attempt may not (the retry loop catches it)."""

    def __init__(self, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.retry_after = retry_after
        """Seconds the server asked us to wait (Retry-After / retry-after-ms), if it said."""


@dataclass(frozen=True)
class Usage:
    """Tokens billed for one answer, as the server reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Request:
    """One chat completion request (OpenAI chat format)."""

    model: str
    """Model name sent to the endpoint."""
    messages: tuple[dict[str, Any], ...]
    """Chat messages; content may be a string or a list of text / image_url parts."""
    max_tokens: int = 60
    """Cap on the answer's tokens."""
    temperature: float = 0.0
    params: tuple[tuple[str, Any], ...] = ()
    """Other body parameters (sorted key/value pairs), part of the cache key."""

    def body(self) -> dict[str, Any]:
        """The JSON body of the request."""
        return {
            "model": self.model,
            "messages": list(self.messages),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            **dict(self.params),
        }

    @cached_property
    def payload(self) -> bytes:
        """The body as canonical JSON (sorted keys, no spaces): hashed for the key and sent
        as is, so a request is serialised once."""
        return json.dumps(self.body(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @cached_property
    def key(self) -> str:
        """Cache key: sha256 of model, messages and every parameter (order-independent)."""
        return hashlib.sha256(self.payload).hexdigest()


@dataclass(frozen=True)
class Response:
    """A successful answer."""

    text: str
    """The message content (may still be unusable to the caller, who parses it)."""
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    """The model the server says answered."""
    finish_reason: str = ""
    cached: bool = False
    """Replayed from the cache: no request was sent."""


class Client(Protocol):
    """The call layer's one interface."""

    async def complete(self, request: Request) -> Response:
        """The answer to `request`; raises :class:`LLMFailure` when there is none."""
        ...


class Transport(Protocol):
    """One attempt of one request against an endpoint (no cache, no retries)."""

    async def send(self, request: Request) -> Response:
        """Raises :class:`TransientError` (retry may help; a timeout is one) or
        :class:`LLMFailure` (it will not). The transport enforces the attempt's time limit."""
        ...
