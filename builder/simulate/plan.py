"""What the simulate stage may send and spend, from the recipe alone (for the offline plan).

`estimate_simulate_cost` mirrors `builder.explain.plan.estimate_explain_cost`: an upper
bound before any model has run. It runs the recipe's own simulators on synthetic neurons
with a recording stand-in for the call layer, so the requests it prices are the ones the
simulators build (their prompts, images, `max_tokens`), estimated with
`builder.llm.limits.estimate_tokens` (typical input tokens; the answer at its `max_tokens`
cap) and priced with `explain.prices` of the simulator model (`simulate.model`, else
`explain.model`); a model without a price costs 0 here, as in the explain estimate.

Counted (per neuron, for its own explanation and, when its category can have another
neuron, the chance baseline's):
- text simulator `llm`: one request per scoring sample (held-out exemplars + random
  samples) with a non-empty description; text, multimodal and unknown neurons;
- visual simulator `llm`: one request per scoring image (the numbered grid at 512 px);
  visual, multimodal and unknown neurons;
- visual simulator `grounded` with `phrases: llm`: one phrase request per explanation. The
  simulator remembers phrases per explanation and the baseline's explanation is another
  scored neuron's own, so this is one request per visual/multimodal/unknown neuron.
With `selection: list` the categories are unknown before classification, so every listed
neuron is counted for both simulators.

Not counted: the detector and segmenter (`grounded`) and the VLM forward pass that records
the random samples' true activations (local GPU/CPU time, no dollars), the offline
simulators (no LLM), requests the call layer's cache or in-flight sharing answers (identical
prompts, reruns), and retries. Bounds assumed: held-out exemplars
`min(exemplars.held_out, classify.top_n - exemplars.shown)`, `simulate.random_samples`
random samples (fewer on a small corpus), descriptions of `plan.caption_tokens` tokens
(`text.max_new_tokens` when generated), explanations at the explainer's length cap.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from builder.config import Recipe

GRID = (24, 24)
"""Patch grid of the synthetic visual samples (the simulators' requests do not depend on it)."""


@dataclass
class _Usage:
    """Requests and estimated tokens of one synthetic neuron for one modality."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class _RecordingClient:
    """Stands in for the call layer: records every request the simulators send and answers
    a fixed text that the simulator parses as "nothing predicted"."""

    def __init__(self, answer: str):
        self.answer = answer
        self.requests: list[Any] = []

    async def complete(self, request: Any) -> Any:
        from types import SimpleNamespace

        self.requests.append(request)
        return SimpleNamespace(text=self.answer)


def _explanations(n: int) -> list[str]:
    """`n` different explanations, each at the explainer's length cap."""
    from builder.explain.parse import MAX_CHARS

    return [(f"concept {i} of " + "x" * MAX_CHARS)[:MAX_CHARS] for i in range(n)]


def _simulate_modality(recipe: Recipe, modality: str, samples: int, neurons: int) -> _Usage:
    """What the recipe's `modality` simulator sends for `neurons` synthetic neurons (1, or 2
    that are each other's baseline) of `samples` scoring samples each, per neuron."""
    from PIL import Image

    from builder.llm.limits import estimate_tokens
    from builder.simulate.llm import client_ask

    cfg = recipe.simulate
    model = cfg.model or recipe.explain.model
    n_tokens = recipe.text.max_new_tokens if recipe.text.source == "generate" else recipe.plan.caption_tokens
    if modality == "text":
        if cfg.text_simulator != "llm":
            return _Usage()
        from builder.simulate.text import LLMTextSimulator

        client = _RecordingClient('{"activations": [%s]}' % ", ".join(["0"] * n_tokens))
        sim: Any = LLMTextSimulator(client_ask(client, model))
        shown: Any = [[" word"] * n_tokens for _ in range(samples)]
    else:
        if cfg.visual_simulator == "llm":
            from builder.simulate.visual import LLMGridSimulator

            client = _RecordingClient('{"activations": {}}')
            sim = LLMGridSimulator(client_ask(client, model), cfg.llm_grid, cfg.image_detail)
        elif cfg.visual_simulator == "grounded" and cfg.phrases == "llm":
            from builder.simulate.grounded import GroundedSimulator

            # No phrase found predicts zeros without the detector, so no model is loaded.
            client = _RecordingClient('{"phrases": []}')
            sim = GroundedSimulator(None, client_ask(client, model),  # type: ignore[arg-type]
                                    cfg.phrases, cfg.max_phrases, cfg.box_threshold, cfg.text_threshold,
                                    cfg.max_boxes)
        else:
            return _Usage()
        from builder.simulate.base import VisualSample

        side = recipe.exemplars.render_size or 336
        shown = []
        for k in range(samples):
            image = Image.new("RGB", (side, side), (255, 255, 255))
            shown.append(VisualSample(f"sample-{k}", image, image))

    explanations = _explanations(neurons)

    async def run() -> None:
        # As the stage's NeuronScorer: each neuron's own explanation, then its baseline's
        # (the other synthetic neuron's), on its scoring samples; one simulator for all.
        for i in range(neurons):
            for explanation in (explanations[i], explanations[(i + 1) % neurons])[: 2 if neurons > 1 else 1]:
                if modality == "text":
                    await sim.simulate(explanation, shown)
                else:
                    await sim.simulate(explanation, shown, GRID)

    asyncio.run(run())
    usage = _Usage()
    for request in client.requests:
        usage.requests += 1
        usage.input_tokens += estimate_tokens(request).typical
        usage.output_tokens += request.max_tokens
    # Per neuron (the synthetic neurons are alike, so the totals divide exactly).
    return _Usage(usage.requests // neurons, usage.input_tokens // neurons, usage.output_tokens // neurons)


def estimate_simulate_cost(recipe: Recipe, layers: int) -> dict[str, float | int]:
    """Upper bound of the simulate stage's LLM requests, tokens and dollars from the recipe
    alone (see the module docstring for what is and is not counted). All zero when the
    simulators in use send no LLM request (`simulate.backend: offline`, no LLM override).
    `simulate_neurons` counts the neurons that would send at least one request. Keys are
    meant for builder.plan.BuildPlan's fields."""
    from builder.simulate.stage import MODALITIES

    ex = recipe.exemplars
    # (category, neurons): with a list the categories are known only after classification.
    if ex.selection == "list":
        groups = [("unknown", len(set(ex.neurons)))]
    else:
        groups = [(c, layers * ex.per_category) for c in ex.categories]
    held_out = min(ex.held_out, max(0, recipe.classify.top_n - ex.shown))
    # A neuron without held-out exemplars fails before any simulator runs.
    samples = held_out + recipe.simulate.random_samples if held_out > 0 else 0

    totals = {"simulate_neurons": 0, "simulate_requests": 0, "simulate_input_tokens": 0,
              "simulate_output_tokens": 0}
    memo: dict[tuple[str, int], _Usage] = {}
    for category, count in groups:
        if count <= 0 or samples == 0:
            continue
        # A baseline needs another neuron of the same category.
        pair = 2 if count >= 2 else 1
        per_neuron = _Usage()
        for modality in MODALITIES.get(category, ("visual", "text")):
            if (modality, pair) not in memo:
                memo[(modality, pair)] = _simulate_modality(recipe, modality, samples, pair)
            u = memo[(modality, pair)]
            per_neuron.requests += u.requests
            per_neuron.input_tokens += u.input_tokens
            per_neuron.output_tokens += u.output_tokens
        if per_neuron.requests == 0:
            continue
        totals["simulate_neurons"] += count
        totals["simulate_requests"] += per_neuron.requests * count
        totals["simulate_input_tokens"] += per_neuron.input_tokens * count
        totals["simulate_output_tokens"] += per_neuron.output_tokens * count

    price = recipe.explain.prices.get(recipe.simulate.model or recipe.explain.model)
    dollars = 0.0
    if price is not None:
        dollars = (totals["simulate_input_tokens"] * price.input_per_mtok
                   + totals["simulate_output_tokens"] * price.output_per_mtok) / 1e6
    return {**totals, "simulate_dollars": dollars}
