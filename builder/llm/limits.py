"""Retry timing, rate limits, token estimates and prices: the call layer's policies.

Everything here is pure or takes its clock, sleep and random source as arguments, so the
tests drive it with fake time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from builder.llm.types import Request, Usage


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait on retryable errors."""

    max_attempts: int = 6
    """Attempts per request, the first included."""
    base_seconds: float = 1.0
    """Backoff before the second attempt; doubles each attempt."""
    max_seconds: float = 60.0
    """Ceiling of one backoff (a server's Retry-After is honoured even when longer)."""

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based).

        With a Retry-After from the server: that long plus up to 10 % jitter (so clients
        told the same value do not return in lockstep). Otherwise "equal jitter": uniform
        in [cap/2, cap] where cap = min(max_seconds, base_seconds * 2**(attempt-1)).
        """
        if retry_after is not None and retry_after >= 0:
            return retry_after * (1 + 0.1 * rng.random())
        cap = min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1))
        return rng.uniform(cap / 2, cap)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RateLimiter:
    """Requests-per-minute and tokens-per-minute token buckets, FIFO.

    Each bucket holds one second's worth of its rate (providers enforce per-minute limits
    over shorter windows), so traffic is smooth rather than a burst per minute. A request
    larger than a bucket may take it negative; later requests then wait for it to refill.
    """

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self._rates = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._capacity = {k: max(1.0, r / 60) for k, r in self._rates.items() if r}
        self._level = dict(self._capacity)
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = asyncio.Lock()

    @property
    def active(self) -> bool:
        return bool(self._capacity)

    def _refill(self) -> None:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        for k, cap in self._capacity.items():
            self._level[k] = min(cap, self._level[k] + elapsed * self._rates[k] / 60)  # type: ignore[operator]

    async def acquire(self, tokens: int) -> None:
        """Wait until one request of about `tokens` tokens may be sent."""
        if not self._capacity:
            return
        need = {"requests": 1.0, "tokens": float(tokens)}
        async with self._lock:  # held while waiting: first come, first served
            while True:
                self._refill()
                wait = 0.0
                for k, cap in self._capacity.items():
                    short = min(need[k], cap) - self._level[k]
                    if short > 0:
                        wait = max(wait, short / (self._rates[k] / 60))  # type: ignore[operator]
                if wait <= 0:
                    for k in self._capacity:
                        self._level[k] -= need[k]
                    return
                await self._sleep(wait)

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Charge the tokens bucket the difference between the estimate and the bill."""
        if "tokens" in self._capacity:
            self._level["tokens"] -= actual_tokens - estimated_tokens


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens of one model."""

    input_per_mtok: float
    output_per_mtok: float

    def dollars(self, usage: Usage) -> float:
        return (usage.prompt_tokens * self.input_per_mtok + usage.completion_tokens * self.output_per_mtok) / 1e6


# -- token estimates ---------------------------------------------------------------------

MESSAGE_OVERHEAD = 4
"""Tokens of chat formatting per message (role and separators)."""
REPLY_PRIMING = 3


def image_tokens(width: int, height: int, detail: str) -> int:
    """Input tokens of one image for GPT-4o's billing rule.

    low: 85. high/auto: fit in 2048 x 2048, then shrink so the short side is at most 768,
    then 85 + 170 per 512-pixel tile (auto is counted as high: an upper bound).
    """
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def data_url_size(url: str) -> tuple[int, int] | None:
    """Pixel size of an image given as a base64 data URL (header only), or None."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    from PIL import Image

    data = url.split(";base64,", 1)[1]
    # The header is near the start: try a prefix before decoding the whole image.
    for chunk in (data[:8192], data):
        try:
            with Image.open(io.BytesIO(base64.b64decode(chunk[: len(chunk) // 4 * 4]))) as im:
                return im.size
        except (OSError, ValueError):
            continue
    return None


@dataclass(frozen=True)
class TokenEstimate:
    """Input tokens of a request before it is sent."""

    typical: int
    """About what the server will bill (text characters / 4, images by the billing rule)."""
    bound: int
    """At least what it will bill: text UTF-8 bytes (a token is at least one byte), images
    by the billing rule. The budget cap reserves this, so it is never exceeded."""
    images: int


def estimate_tokens(request: Request) -> TokenEstimate:
    typical = bound = REPLY_PRIMING
    images = 0
    for message in request.messages:
        typical += MESSAGE_OVERHEAD
        bound += MESSAGE_OVERHEAD
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        for part in parts:
            if part.get("type") == "text":
                text = str(part.get("text", ""))
                typical += math.ceil(len(text) / 4)
                bound += len(text.encode("utf-8"))
            elif part.get("type") == "image_url":
                image = part.get("image_url") or {}
                size = data_url_size(str(image.get("url", ""))) or (2048, 2048)
                n = image_tokens(size[0], size[1], str(image.get("detail", "auto")))
                typical += n
                bound += n
                images += 1
            else:
                blob = len(json.dumps(part))
                typical += math.ceil(blob / 4)
                bound += blob
    return TokenEstimate(typical, bound, images)
