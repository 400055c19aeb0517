"""The recipe-only estimate of the simulate stage's LLM requests, tokens and dollars
(`builder.simulate.plan.estimate_simulate_cost`): a hand computation on the tiny recipe,
zero when nothing asks an LLM, and the request count the stage really makes."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.explain import fake_openai
from builder.config import load_recipe
from builder.explain.parse import MAX_CHARS
from builder.llm.limits import MESSAGE_OVERHEAD, REPLY_PRIMING
from builder.simulate.grounded import phrases_prompt
from builder.simulate.plan import estimate_simulate_cost
from builder.simulate.text import TEXT_SYSTEM, text_prompt
from builder.simulate.visual import VISUAL_SYSTEM, visual_prompt

KEYS = {"simulate_neurons", "simulate_requests", "simulate_input_tokens", "simulate_output_tokens", "simulate_dollars"}
LIST3 = ["exemplars.selection=list", "exemplars.neurons=[[0, 1], [0, 2], [1, 3]]"]


def _chars_tokens(*texts: str) -> int:
    """Typical input tokens of string messages: priming + per message overhead + chars / 4."""
    return REPLY_PRIMING + sum(MESSAGE_OVERHEAD + math.ceil(len(t) / 4) for t in texts)


def test_hand_computation_grounded_phrases_and_llm_text():
    # tiny: top_n 20, shown 5, held_out 5, caption_tokens 20; 3 listed neurons (categories
    # unknown before classification: both simulators), each with a baseline.
    recipe = load_recipe("tiny", ["simulate.backend=openai", "simulate.random_samples=3", "simulate.model=gpt-4o-mini",
                                  *LIST3])
    est = estimate_simulate_cost(recipe, layers=2)
    assert set(est) == KEYS
    samples = 5 + 3
    explanation = "x" * MAX_CHARS  # the explainer's length cap (token estimates count characters)
    phrases_in = _chars_tokens(phrases_prompt(explanation, 3)[0]["content"])
    text_in = _chars_tokens(TEXT_SYSTEM, text_prompt(explanation, [" word"] * 20)[1]["content"])
    # grounded: one phrase request per neuron (the baseline's explanation is another neuron's,
    # remembered); text: one request per sample, for its own and the baseline's explanation.
    per_neuron_requests = 1 + samples * 2
    assert est["simulate_neurons"] == 3
    assert est["simulate_requests"] == 3 * per_neuron_requests == 51
    assert est["simulate_input_tokens"] == 3 * (phrases_in + 2 * samples * text_in)
    assert est["simulate_output_tokens"] == 3 * ((32 + 16 * 3) + 2 * samples * (32 + 4 * 20))
    assert est["simulate_dollars"] == pytest.approx(
        (est["simulate_input_tokens"] * 0.15 + est["simulate_output_tokens"] * 0.6) / 1e6)


def test_hand_computation_vision_llm_grid_by_category():
    # top_confidence: per (layer, category) quota; visual neurons go to the visual simulator
    # only, text neurons to the text simulator only, multimodal to both.
    recipe = load_recipe("tiny", ["simulate.backend=openai", "simulate.visual=llm", "simulate.image_detail=low",
                                  "exemplars.per_category=2", "exemplars.categories=[visual, text]",
                                  "plan.caption_tokens=6"])
    est = estimate_simulate_cost(recipe, layers=3)
    samples = 5 + 5
    explanation = "x" * MAX_CHARS
    text_in = _chars_tokens(TEXT_SYSTEM, text_prompt(explanation, [" word"] * 6)[1]["content"])
    grid_text = visual_prompt(explanation, {"type": "image_url"}, 8)[1]["content"][0]["text"]
    grid_in = _chars_tokens(VISUAL_SYSTEM, grid_text) + 85  # a low-detail image is 85 tokens
    visual, text = 3 * 2, 3 * 2
    assert est["simulate_neurons"] == visual + text
    assert est["simulate_requests"] == (visual + text) * samples * 2
    assert est["simulate_input_tokens"] == 2 * samples * (visual * grid_in + text * text_in)
    assert est["simulate_output_tokens"] == 2 * samples * (visual * (32 + 6 * 64) + text * (32 + 4 * 6))
    assert est["simulate_dollars"] == pytest.approx(
        (est["simulate_input_tokens"] * 2.5 + est["simulate_output_tokens"] * 10) / 1e6)


def test_a_lone_neuron_has_no_baseline_and_no_held_out_means_no_requests():
    one = estimate_simulate_cost(load_recipe("tiny", ["simulate.backend=openai", "simulate.phrases=explanation",
                                                      "exemplars.selection=list", "exemplars.neurons=[[0, 1]]"]), 2)
    assert one["simulate_requests"] == 5 + 5  # text only (phrases from the explanation), no baseline
    none = estimate_simulate_cost(load_recipe("tiny", ["simulate.backend=openai", "exemplars.held_out=0"]), 2)
    assert none["simulate_requests"] == none["simulate_neurons"] == 0


@pytest.mark.parametrize("overrides", [
    [],  # the tiny recipe: offline simulators
    ["simulate.backend=offline", "explain.backend=openai"],
    ["simulate.backend=openai", "simulate.visual=offline", "simulate.text=offline"],
    ["simulate.text=offline", "simulate.visual=grounded", "simulate.phrases=explanation"],
])
def test_zero_when_no_simulator_asks_an_llm(overrides):
    est = estimate_simulate_cost(load_recipe("tiny", overrides), layers=4)
    assert est == {k: 0 for k in KEYS}


def test_unpriced_model_counts_tokens_not_dollars():
    est = estimate_simulate_cost(load_recipe("tiny", ["simulate.backend=openai", "simulate.model=no-price"]), 2)
    assert est["simulate_requests"] > 0 and est["simulate_input_tokens"] > 0 and est["simulate_dollars"] == 0


# -- against the stage ----------------------------------------------------------------------



def test_request_count_is_what_the_stage_asks(simulated_run: Path, tmp_path: Path, monkeypatch):
    """Two text neurons with full scoring sets, each the other's baseline: the stage asks the
    call layer exactly the estimated number of requests (identical ones may share a call)."""
    from builder.llm.client import CachedClient
    from builder.run import Executor
    from builder.simulate.stage import SCORES_FILE, SimulateStage

    run = tmp_path / "run"
    shutil.copytree(simulated_run, run)
    sets = {(r["layer"], r["neuron"]): (r["n_held_out"], r["n_random"])
            for r in pq.read_table(run / SCORES_FILE).to_pylist()}
    table = pq.read_table(run / "explanations.parquet")
    full = [r for r in table.to_pylist()
            if r["category"] == "text" and r["status"] == "ok" and sets[(r["layer"], r["neuron"])] == (5, 5)]
    a = full[0]
    b = next(r for r in full[1:] if r["explanation"] != a["explanation"])
    table = pa.Table.from_pylist([a, b], schema=table.schema)
    pq.write_table(table, run / "explanations.parquet")
    (run / SCORES_FILE).unlink()
    (run / "simulate" / "scored.jsonl").unlink(missing_ok=True)

    asked = []
    complete = CachedClient.complete

    async def counting(self, request):
        asked.append(request)
        return await complete(self, request)

    monkeypatch.setattr(CachedClient, "complete", counting)
    fake = fake_openai
    overrides = ["simulate.backend=openai", "simulate.visual=offline", "explain.max_attempts=1"]
    def zeros(body: dict) -> str:  # a valid answer: one 0 per numbered token
        n = len(re.findall(r"(?m)^\d+\t", body["messages"][-1]["content"]))
        return json.dumps({"activations": [0] * n})

    with fake.FakeOpenAI(answer=zeros) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        Executor(load_recipe("tiny", overrides), run, [SimulateStage()]).run()
        sent = len(server.entries())
    rows = pq.read_table(run / SCORES_FILE).to_pylist()
    assert len(rows) == 2 and all(r["status"] != "failed" and r["baseline_score"] is not None for r in rows)
    neurons = f"[[{a['layer']}, {a['neuron']}], [{b['layer']}, {b['neuron']}]]"
    est = estimate_simulate_cost(load_recipe("tiny", [*overrides, "exemplars.selection=list",
                                                      f"exemplars.neurons={neurons}"]), layers=2)
    assert est["simulate_neurons"] == 2
    assert len(asked) == est["simulate_requests"] == 2 * (5 + 5) * 2
    assert 0 < sent <= est["simulate_requests"]
