"""The call layer: cache, concurrency, rate limits, retries, cost ledger and budget cap
around a transport.

`complete(request)` in order:
1. an answer cached for the request's key is returned (no request); so is a remembered
   terminal failure (refusal, empty answer, content filter, non-retryable HTTP error),
   raised again, unless `retry_failed`;
2. a concurrency slot is taken (semaphore); identical requests in flight share one call;
3. per attempt: the request's worst-case cost is reserved against the budget (or it fails
   `budget_exhausted` without being sent), the rate limiter is passed, the transport sends;
4. retryable errors wait (jittered exponential backoff, or the server's Retry-After) and
   retry up to `max_attempts`, then fail `retries_exhausted`;
5. every billed answer (a refusal is billed too) goes into the ledger; an answer is cached
   the moment it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder.llm.cache import ResponseCache
from builder.llm.limits import Price, RateLimiter, RetryPolicy, TokenEstimate, estimate_tokens
from builder.llm.types import TERMINAL_KINDS, FailureKind, LLMFailure, Request, Response, Transport, TransientError, Usage

log = logging.getLogger("builder")


@dataclass(frozen=True)
class CallSettings:
    """Policies of one client."""

    max_concurrency: int = 8
    """Requests in flight at once."""
    timeout_seconds: float = 60.0
    """One attempt's time limit."""
    retry: RetryPolicy = RetryPolicy()
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    budget_usd: float | None = None
    """Cap on the dollars of `scope` recorded in the cache's ledger (over every run using it)."""
    prices: dict[str, Price] = field(default_factory=dict)
    """Per model name; a model without a price is counted in tokens only."""
    retry_failed: bool = False
    """Resend requests whose remembered answer was a terminal failure."""
    scope: str = "explain"
    """Ledger scope the budget applies to (one per stage)."""
    seed: int = 0
    """Seed of the backoff jitter."""


@dataclass
class CallStats:
    """What one client did (manifest counts)."""

    sent: int = 0
    """HTTP attempts made."""
    answered: int = 0
    """Answers received and cached."""
    cache_hits: int = 0
    """Requests answered (or failed) from the cache without sending."""
    retries: int = 0
    failures: Counter = field(default_factory=Counter)
    """FailureKind value -> count."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dollars: float = 0.0
    """Spent by this client (not earlier runs)."""


class CachedClient:
    """The :class:`~builder.llm.types.Client` every stage uses."""

    def __init__(
        self,
        transport: Callable[[], Transport],
        cache: ResponseCache,
        settings: CallSettings,
        sleep: Callable[[float], object] = asyncio.sleep,
    ):
        self._make_transport = transport
        self._transport: Transport | None = None
        self.cache = cache
        self.settings = settings
        self.stats = CallStats()
        self._rng = random.Random(settings.seed)
        self._sleep = sleep
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)
        self._limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        self._inflight: dict[str, asyncio.Future[Response]] = {}
        self._spent = cache.spent(settings.scope)
        self._reserved = 0.0
        self._holders = 0
        """Requests holding a reservation."""
        self._settled = asyncio.Condition()

    @property
    def transport(self) -> Transport:
        # Made on first use, so that a fully cached rerun needs no endpoint or key.
        if self._transport is None:
            self._transport = self._make_transport()
        return self._transport

    async def aclose(self) -> None:
        """Close the transport's connections (the cache stays open)."""
        close = getattr(self._transport, "aclose", None)
        if close is not None:
            await close()
        self._transport = None

    def price(self, model: str) -> Price | None:
        return self.settings.prices.get(model)

    def is_cached(self, request: Request) -> bool:
        """The request would be answered without sending (answer or remembered failure)."""
        return self.cache.settled(request.key, failures_count=not self.settings.retry_failed)

    async def complete(self, request: Request) -> Response:
        key = request.key
        hit = self._from_cache(key)
        if hit is not None:
            return hit
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            async with self._semaphore:
                response = await self._send(request, key)
            future.set_result(response)
            return response
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._inflight[key]

    def _from_cache(self, key: str) -> Response | None:
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cache_hits += 1
            return hit
        if not self.settings.retry_failed:
            failed = self.cache.get_failure(key)
            if failed is not None:
                self.stats.cache_hits += 1
                self.stats.failures[failed[0].value] += 1
                raise LLMFailure(failed[0], failed[1], cached=True)
        return None

    async def _send(self, request: Request, key: str) -> Response:
        price = self.price(request.model)
        # Estimating reads every image's header: only when a budget or a token limit needs it.
        needs_estimate = self.settings.budget_usd is not None or self.settings.tokens_per_minute is not None
        estimate = estimate_tokens(request) if needs_estimate else TokenEstimate(0, 0, 0)
        worst = price.dollars(Usage(estimate.bound, request.max_tokens)) if price else 0.0
        policy = self.settings.retry
        last = ""
        for attempt in range(1, policy.max_attempts + 1):
            await self._reserve(worst)
            try:
                await self._limiter.acquire(estimate.typical + request.max_tokens)
                self.stats.sent += 1
                response = await self.transport.send(request)  # the transport enforces timeout_seconds
            except TransientError as e:
                await self._release(worst)
                retry_after = e.retry_after
                last = str(e)
                if attempt == policy.max_attempts:
                    break
                self.stats.retries += 1
                delay = policy.delay(attempt, self._rng, retry_after)
                log.debug("llm: attempt %d failed (%s); retrying in %.2fs", attempt, last, delay)
                await self._sleep(delay)
                continue
            except LLMFailure as e:
                if e.usage is not None:
                    self.cache.record_cost(key, self.settings.scope, request.model, e.usage,
                                           self._bill(request.model, e.usage, estimate.typical + request.max_tokens))
                await self._release(worst)
                if e.kind in TERMINAL_KINDS:
                    self.cache.put_failure(key, request.model, e.kind, e.detail)
                self.stats.failures[e.kind.value] += 1
                raise
            except BaseException:
                await self._release(worst)
                raise
            dollars = self._bill(request.model, response.usage, estimate.typical + request.max_tokens)
            self.cache.put(key, request.model, response, self.settings.scope, dollars)
            await self._release(worst)
            self.stats.answered += 1
            return response
        self.stats.failures[FailureKind.RETRIES_EXHAUSTED.value] += 1
        raise LLMFailure(FailureKind.RETRIES_EXHAUSTED, f"{policy.max_attempts} attempts; last: {last}")

    async def _reserve(self, worst: float) -> None:
        """Reserve a request's worst-case cost, or fail `budget_exhausted` without sending.

        A request that fits the budget only once the requests in flight have settled (their
        actual cost is below their reservation) waits for them rather than failing.
        """
        budget = self.settings.budget_usd
        if budget is None:
            return
        async with self._settled:
            while self._spent + self._reserved + worst > budget:
                if self._spent + worst > budget or self._holders == 0:
                    self.stats.failures[FailureKind.BUDGET_EXHAUSTED.value] += 1
                    raise LLMFailure(
                        FailureKind.BUDGET_EXHAUSTED,
                        f"spent ${self._spent:.4f} + this request's worst case ${worst:.4f} > budget ${budget:.4f}",
                    )
                await self._settled.wait()
            self._reserved += worst
            self._holders += 1

    async def _release(self, worst: float) -> None:
        if self.settings.budget_usd is None:
            return
        async with self._settled:
            self._reserved -= worst
            self._holders -= 1
            self._settled.notify_all()

    def _bill(self, model: str, usage: Usage, estimated_tokens: int) -> float:
        """Count a billed answer in this client's totals; its dollars (0 without a price)."""
        price = self.price(model)
        dollars = price.dollars(usage) if price else 0.0
        self._limiter.settle(estimated_tokens, usage.total)
        self._spent += dollars
        self.stats.dollars += dollars
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        return dollars


def openai_client(cache_path: str | Path, settings: CallSettings) -> CachedClient:
    """A cached client over the OpenAI-compatible endpoint of `OPENAI_BASE_URL` / `OPENAI_API_KEY`."""
    from builder.llm.openai_backend import OpenAITransport

    return CachedClient(lambda: OpenAITransport(timeout=settings.timeout_seconds), ResponseCache(cache_path), settings)
