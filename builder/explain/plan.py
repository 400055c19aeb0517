"""What the explain stage will send and spend, before anything is sent.

`plan_explain(ctx)` is exact in what it counts (the selected neurons, their shown
exemplars, the very requests the stage would build, which of them the cache already
answers) and estimates tokens the way the budget does: text characters / 4, images by
GPT-4o's billing rule, the answer at its `max_tokens` cap. `estimate_explain_cost` gives
an upper bound from the recipe alone, before any model has run (for the offline plan).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from builder.config import Recipe
from builder.explain.records import Exemplar, NeuronExemplars
from builder.llm.cache import ResponseCache
from builder.run import RunContext


@dataclass
class ExplainPlan:
    """What `--dry-run` prints about the explain stage."""

    backend: str
    model: str
    prompt_version: str
    neurons: int
    by_category: dict[str, int] = field(default_factory=dict)
    exemplars: int = 0
    """Shown exemplars, over all neurons."""
    images: int = 0
    """Images in the requests (visual and multimodal neurons)."""
    requests: int = 0
    """Requests that would be sent (not answered from the cache)."""
    cached: int = 0
    """Requests the cache already answers (free)."""
    input_tokens: int = 0
    """Estimated prompt tokens of the requests to send."""
    output_tokens: int = 0
    """Upper bound of answer tokens (max_tokens per request)."""
    dollars: float | None = 0.0
    """Estimated dollars; None when the model has no price in explain.prices."""
    budget_usd: float | None = None
    spent_usd: float = 0.0
    """Already recorded in the ledger of the cache (earlier runs)."""

    def render(self) -> str:
        cats = ", ".join(f"{c} {n}" for c, n in self.by_category.items()) or "none"
        lines = [
            "explain plan (nothing sent)",
            f"  backend     {self.backend} {self.model} (prompt {self.prompt_version})",
            f"  neurons     {self.neurons:,} ({cats})",
            f"  exemplars   {self.exemplars:,} shown, {self.images:,} images",
        ]
        if self.backend == "offline":
            lines.append("  requests    none: the offline baseline needs no LLM")
            return "\n".join(lines)
        cost = "unknown (no price for this model in explain.prices)" if self.dollars is None else f"~${self.dollars:,.2f}"
        lines += [
            f"  requests    {self.requests:,} to send, {self.cached:,} answered by the cache",
            f"  tokens      ~{self.input_tokens:,} input + up to {self.output_tokens:,} output",
            f"  cost        {cost}",
            f"  budget      {'none' if self.budget_usd is None else f'${self.budget_usd:,.2f}'}"
            f" (spent so far ${self.spent_usd:,.2f})",
        ]
        return "\n".join(lines)


def _plan(recipe: Recipe, neurons: list[NeuronExemplars], cache: ResponseCache | None) -> ExplainPlan:
    from builder.explain.offline import OFFLINE_NAME, OFFLINE_VERSION
    from builder.explain.prompts import PROMPT_VERSION, explain_request
    from builder.llm.limits import estimate_tokens

    cfg = recipe.explain
    offline = cfg.backend == "offline"
    plan = ExplainPlan(
        backend=cfg.backend,
        model=OFFLINE_NAME if offline else cfg.model,
        prompt_version=OFFLINE_VERSION if offline else PROMPT_VERSION,
        neurons=len(neurons),
        budget_usd=None if offline else cfg.budget_usd,
    )
    for n in neurons:
        plan.by_category[n.category] = plan.by_category.get(n.category, 0) + 1
        plan.exemplars += len(n.exemplars)
        if n.category in ("visual", "multimodal"):
            plan.images += len(n.exemplars)
    if offline:
        return plan
    price = cfg.prices.get(cfg.model)
    for n in neurons:
        request = explain_request(n, cfg)
        if cache is not None and cache.settled(request.key, failures_count=not cfg.retry_failed):
            plan.cached += 1
            continue
        plan.requests += 1
        plan.input_tokens += estimate_tokens(request).typical
        plan.output_tokens += request.max_tokens
    if price is None:
        plan.dollars = None
    else:
        plan.dollars = (plan.input_tokens * price.input_per_mtok + plan.output_tokens * price.output_per_mtok) / 1e6
    if cache is not None:
        plan.spent_usd = cache.spent("explain")
    return plan


def plan_explain(ctx: RunContext) -> ExplainPlan:
    """The plan of the explain stage of a run whose exemplars stage is done."""
    from builder.explain.backends import cache_path
    from builder.explain.stage import load_neuron_exemplars

    neurons = load_neuron_exemplars(ctx.run_dir)
    path = cache_path(ctx)
    cache = ResponseCache(path) if path.exists() and ctx.recipe.explain.backend != "offline" else None
    try:
        return _plan(ctx.recipe, neurons, cache)
    finally:
        if cache is not None:
            cache.close()


def estimate_explain_cost(recipe: Recipe, layers: int) -> dict[str, float | int]:
    """Upper bound from the recipe alone: every (layer, category) fills its `per_category`
    quota, and every neuron is priced as multimodal (images and tokens), with descriptions
    of `plan.caption_tokens` (or `text.max_new_tokens` when generated) and images at
    `exemplars.render_size` (336 when unset). Keys match builder.plan.BuildPlan's fields."""
    from PIL import Image

    ex = recipe.exemplars
    if ex.selection == "list":
        count = len(set(ex.neurons))
    else:
        count = layers * len(ex.categories) * ex.per_category
    side = ex.render_size or 336
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (255, 255, 255)).save(buf, format="PNG")
    n_tokens = recipe.text.max_new_tokens if recipe.text.source == "generate" else recipe.plan.caption_tokens
    sample = Exemplar("sample", 0, buf.getvalue(), tuple(" word" for _ in range(n_tokens)), tuple(5.0 for _ in range(n_tokens)))
    one = NeuronExemplars(0, 0, "multimodal", tuple(sample for _ in range(max(ex.shown, 1))))
    single = _plan(recipe, [one], None)
    dollars = single.dollars or 0.0
    return {
        "explain_neurons": count,
        "explain_requests": single.requests * count,
        "explain_input_tokens": single.input_tokens * count,
        "explain_output_tokens": single.output_tokens * count,
        "explain_dollars": dollars * count,
    }
