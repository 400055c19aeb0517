"""The explainer backends behind one interface, chosen by `explain.backend`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from builder.config import ExplainConfig
from builder.explain.offline import CorpusWords, OfflineExplainer
from builder.explain.parse import parse_explanation
from builder.explain.prompts import PROMPT_VERSION, explain_request
from builder.explain.records import Explainer, NeuronExemplars
from builder.llm.client import CachedClient, CallSettings, openai_client
from builder.llm.limits import Price, RetryPolicy
from builder.llm.types import Client, Request
from builder.run import RunContext


class LLMExplainer:
    """Asks an LLM through the call layer (cache, retries, typed failures, ledger)."""

    prompt_version = PROMPT_VERSION

    def __init__(self, client: Client, cfg: ExplainConfig, backend: str = "openai"):
        self.client = client
        self.cfg = cfg
        self.name = f"{backend}:{cfg.model}"

    def request(self, neuron: NeuronExemplars) -> Request:
        return explain_request(neuron, self.cfg)

    def prepare(self, neuron: NeuronExemplars) -> Request:
        request = self.request(neuron)
        request.key  # serialises and hashes the body now (cached on the request), not on the send's path
        return request

    async def explain(self, prepared: Request) -> str:
        response = await self.client.complete(prepared)
        return parse_explanation(response.text)


def call_settings(cfg: ExplainConfig, scope: str = "explain") -> CallSettings:
    """The call layer's policies from the `explain` recipe section."""
    return CallSettings(
        max_concurrency=cfg.max_concurrency,
        timeout_seconds=cfg.timeout_seconds,
        retry=RetryPolicy(cfg.max_attempts, cfg.retry_base_seconds, cfg.retry_max_seconds),
        requests_per_minute=cfg.requests_per_minute,
        tokens_per_minute=cfg.tokens_per_minute,
        budget_usd=cfg.budget_usd,
        prices={m: Price(p.input_per_mtok, p.output_per_mtok) for m, p in cfg.prices.items()},
        retry_failed=cfg.retry_failed,
        scope=scope,
        seed=cfg.seed,
    )


def cache_path(ctx: RunContext) -> Path:
    """The LLM cache file of this run (`explain.cache_path`, else RUN_DIR/llm-cache.sqlite)."""
    cfg = ctx.recipe.explain
    return Path(cfg.cache_path) if cfg.cache_path else ctx.run_dir.path("llm-cache.sqlite")


def _openai(ctx: RunContext) -> tuple[Explainer, CachedClient | None]:
    client = openai_client(cache_path(ctx), call_settings(ctx.recipe.explain))
    return LLMExplainer(client, ctx.recipe.explain), client


def _offline(ctx: RunContext) -> tuple[Explainer, CachedClient | None]:
    from builder.text import read_texts

    texts = {sid: t.text for sid, t in read_texts(ctx.run_dir.texts).items()}
    return OfflineExplainer(CorpusWords(texts), ctx.recipe.explain), None


EXPLAINERS: dict[str, Callable[[RunContext], tuple[Explainer, CachedClient | None]]] = {
    "openai": _openai,
    "offline": _offline,
}
"""`explain.backend` -> factory of (explainer, its call-layer client or None)."""


def make_explainer(ctx: RunContext) -> tuple[Explainer, CachedClient | None]:
    return EXPLAINERS[ctx.recipe.explain.backend](ctx)
