"""The call layer against a real HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from builder.llm.cache import ResponseCache
from builder.llm.client import CachedClient, CallSettings
from builder.llm.limits import Price, RateLimiter, RetryPolicy, estimate_tokens, image_tokens, parse_retry_after
from builder.llm.openai_backend import EndpointError, OpenAITransport, http_client_kind
from builder.llm.types import FailureKind, LLMFailure, Request, Response, Usage


def make_client(path: Path, base_url: str, http: str = "auto", **kw) -> CachedClient:
    settings = CallSettings(timeout_seconds=0.5, retry=kw.pop("retry", RetryPolicy(8, 0.01, 0.05)), **kw)
    return CachedClient(lambda: OpenAITransport(timeout=0.5, base_url=base_url, api_key="k", http=http),
                        ResponseCache(path), settings)


def questions(n: int) -> list[Request]:
    return [Request(model="gpt-4o", messages=({"role": "user", "content": f"question {i}"},)) for i in range(n)]


def run_all(client: CachedClient, reqs: list[Request]) -> list[Response | LLMFailure]:
    async def one(r: Request) -> Response | LLMFailure:
        try:
            return await client.complete(r)
        except LLMFailure as e:
            return e

    async def main() -> list[Response | LLMFailure]:
        try:
            return list(await asyncio.gather(*(one(r) for r in reqs)))
        finally:
            await client.aclose()

    return asyncio.run(main())


def kinds(results: list[Response | LLMFailure]) -> Counter:
    return Counter(r.kind.value for r in results if isinstance(r, LLMFailure))


@pytest.mark.parametrize("http", ["aiohttp", "httpx"])
def test_every_fault_ends_in_an_answer_or_a_typed_failure_and_a_rerun_sends_nothing(tmp_path, fake_server,
                                                                                     fake_module, http):
    fake_server.faults = ["429", "500", "503", "hang", "malformed", "empty_choices", "refusal", "content_filter",
                          "400", "400_filter"]
    reqs = questions(16)
    client = make_client(tmp_path / "c.sqlite", fake_server.base_url, http=http, max_concurrency=4)
    results = run_all(client, reqs)
    assert client.stats.sent and len(results) == 16
    # Transient faults were retried away; terminal ones are typed, one request each.
    assert kinds(results) == Counter({"empty": 1, "refusal": 1, "content_filter": 2, "http_error": 1})
    answers = [(q, r) for q, r in zip(reqs, results) if isinstance(r, Response)]
    assert len(answers) == 11
    for q, r in answers:  # each answer is the one the server gave to that very request
        assert r.text == f"concept {q.key[:10]}"
        assert not r.cached and r.usage == Usage(100, 5)
    log = fake_server.entries()
    assert {e.key for e in log} == {q.key for q in reqs}  # the server's key is the client's key
    assert client.stats.sent == len(log) == 16 + 5  # five transient faults, five resends
    assert client.stats.retries == 5

    before = len(fake_server.entries())
    again = run_all(make_client(tmp_path / "c.sqlite", fake_server.base_url), reqs)
    assert len(fake_server.entries()) == before, "a rerun must send nothing"
    assert kinds(again) == kinds(results)
    assert all(a.cached for a in again)
    assert [a.text for a in again if isinstance(a, Response)] == [r.text for _, r in answers]


def test_the_http_client_is_aiohttp_unless_the_environment_names_a_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert http_client_kind("auto") == "aiohttp"
    assert OpenAITransport(timeout=1, base_url="http://127.0.0.1:9/v1", api_key="k").http == "aiohttp"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert http_client_kind("auto") == "httpx"  # aiohttp would ignore the proxy
    assert http_client_kind("aiohttp") == "aiohttp"
    with pytest.raises(ValueError, match="auto, aiohttp or httpx"):
        http_client_kind("requests")


def test_retry_after_is_honoured(tmp_path, fake_server):
    fake_server.faults = ["429"]
    fake_server.retry_after = "0.3"
    [result] = run_all(make_client(tmp_path / "c.sqlite", fake_server.base_url), questions(1))
    assert isinstance(result, Response)
    first, second = fake_server.entries()
    assert first.fault == "429" and second.fault == "ok"
    assert 0.3 <= second.at - first.at < 1.0


def test_retries_exhausted_is_not_remembered(tmp_path, fake_server):
    fake_server.faults = ["503", "500", "hang"]
    path = tmp_path / "c.sqlite"
    [result] = run_all(make_client(path, fake_server.base_url, retry=RetryPolicy(3, 0.01, 0.02)), questions(1))
    assert isinstance(result, LLMFailure) and result.kind is FailureKind.RETRIES_EXHAUSTED
    assert "3 attempts" in str(result) and "timeout" in str(result)
    assert len(fake_server.entries()) == 3
    # A transient failure is retried on the next run (and now succeeds).
    [result] = run_all(make_client(path, fake_server.base_url), questions(1))
    assert isinstance(result, Response)
    assert len(fake_server.entries()) == 4


def test_non_retryable_errors_are_sent_once(tmp_path, fake_server):
    fake_server.faults = ["400", "400_filter"]
    results = run_all(make_client(tmp_path / "c.sqlite", fake_server.base_url, max_concurrency=1), questions(2))
    assert [r.kind for r in results] == [FailureKind.HTTP_ERROR, FailureKind.CONTENT_FILTER]
    assert "HTTP 400" in str(results[0])
    assert len(fake_server.entries()) == 2


def test_retry_failed_resends_remembered_failures(tmp_path, fake_server):
    fake_server.faults = ["refusal"]
    path = tmp_path / "c.sqlite"
    [r] = run_all(make_client(path, fake_server.base_url), questions(1))
    assert r.kind is FailureKind.REFUSAL and "I can't help" in str(r)
    [r] = run_all(make_client(path, fake_server.base_url), questions(1))
    assert r.kind is FailureKind.REFUSAL and r.cached
    [r] = run_all(make_client(path, fake_server.base_url, retry_failed=True), questions(1))
    assert isinstance(r, Response)
    assert len(fake_server.entries()) == 2


def test_identical_requests_in_flight_share_one_call(tmp_path, fake_server):
    fake_server.latency = 0.1
    req = questions(1)[0]
    results = run_all(make_client(tmp_path / "c.sqlite", fake_server.base_url), [req, req, req])
    assert len({r.text for r in results}) == 1
    assert len(fake_server.entries()) == 1


@pytest.mark.parametrize("concurrency", [1, 4])
def test_budget_cap_stops_before_it_is_exceeded(tmp_path, fake_server, concurrency):
    fake_server.usage = (10, 5)
    prices = {"gpt-4o": Price(1000.0, 1000.0)}  # $0.001 per token: a few cents per request
    reqs = questions(6)
    worst = prices["gpt-4o"].dollars(Usage(estimate_tokens(reqs[0]).bound, reqs[0].max_tokens))
    actual = prices["gpt-4o"].dollars(Usage(10, 5))
    budget = 2 * actual + worst + 0.001  # room for exactly three requests
    path = tmp_path / "c.sqlite"
    # With several in flight, a request that fits only after the others settle waits for them.
    client = make_client(path, fake_server.base_url, max_concurrency=concurrency, budget_usd=budget, prices=prices)
    results = run_all(client, reqs)
    sent = [r for r in results if isinstance(r, Response)]
    assert len(sent) == 3 and len(fake_server.entries()) == 3
    assert kinds(results) == Counter({"budget_exhausted": 3})
    spent = ResponseCache(path).spent("explain")
    assert spent == pytest.approx(3 * actual) and spent <= budget
    assert spent + worst > budget  # it stopped because the next one could have gone over
    # The ledger persists: a rerun with the same budget sends nothing more.
    again = run_all(make_client(path, fake_server.base_url, max_concurrency=1, budget_usd=budget, prices=prices), reqs)
    assert len(fake_server.entries()) == 3
    assert kinds(again) == Counter({"budget_exhausted": 3})
    summary = ResponseCache(path).ledger_summary("explain")
    assert summary["gpt-4o"]["answers"] == 3 and summary["gpt-4o"]["prompt_tokens"] == 30


def test_zero_budget_sends_nothing(tmp_path, fake_server):
    client = make_client(tmp_path / "c.sqlite", fake_server.base_url, budget_usd=0.0,
                         prices={"gpt-4o": Price(2.5, 10.0)})
    assert kinds(run_all(client, questions(3))) == Counter({"budget_exhausted": 3})
    assert fake_server.entries() == []


def test_a_fully_cached_rerun_needs_no_endpoint(tmp_path, fake_server, monkeypatch):
    path = tmp_path / "c.sqlite"
    first = run_all(make_client(path, fake_server.base_url), questions(3))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    offline = CachedClient(lambda: OpenAITransport(timeout=1.0), ResponseCache(path), CallSettings())
    assert [r.text for r in run_all(offline, questions(3))] == [r.text for r in first]
    with pytest.raises(EndpointError, match="OPENAI_API_KEY"):
        run_all(offline, questions(4))


def test_importing_has_no_side_effects():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    code = "import builder.llm, builder.explain.stage, builder.explain.backends, builder.exemplars; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# -- policies --------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_limiter_spaces_requests_and_tokens():
    t = FakeTime()
    limiter = RateLimiter(60, None, clock=t.clock, sleep=t.sleep)  # one request per second

    async def go() -> None:
        for _ in range(3):
            await limiter.acquire(1000)

    asyncio.run(go())
    assert t.now == pytest.approx(2.0)

    t = FakeTime()
    limiter = RateLimiter(None, 600, clock=t.clock, sleep=t.sleep)  # 10 tokens per second

    async def tokens() -> None:
        await limiter.acquire(10)  # the full bucket
        await limiter.acquire(10)  # waits 1 s
        await limiter.acquire(25)  # bigger than the bucket: waits for a full one (1 s), goes negative
        await limiter.acquire(1)  # waits for the 15-token debt plus its own (1.6 s)

    asyncio.run(tokens())
    assert t.sleeps == pytest.approx([1.0, 1.0, 1.6])


def test_backoff_is_jittered_exponential_and_capped():
    policy = RetryPolicy(max_attempts=10, base_seconds=1.0, max_seconds=8.0)
    rng = random.Random(0)
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (7, 8.0)]:
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert min(delays) >= cap / 2 and max(delays) <= cap
        assert len(set(delays)) > 100  # jittered
    assert [policy.delay(2, random.Random(5)) for _ in range(2)] == [policy.delay(2, random.Random(5))] * 2
    honoured = [policy.delay(1, rng, retry_after=30.0) for _ in range(100)]
    assert min(honoured) >= 30.0 and max(honoured) <= 33.0  # beyond max_seconds: the server knows best


def test_retry_after_headers():
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({}) is None


def test_image_token_rule_matches_openai_examples():
    assert image_tokens(1024, 1024, "low") == 85
    assert image_tokens(1024, 1024, "high") == 765  # 768x768: 4 tiles
    assert image_tokens(2048, 4096, "high") == 1105  # 1024x2048 -> 768x1536: 6 tiles
    assert image_tokens(336, 336, "auto") == 255
