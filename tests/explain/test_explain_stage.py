"""The explain stage on a real tiny run: offline baseline, the openai backend against the
fake server with faults, a SIGKILL mid-stage, the budget cap and --dry-run."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from builder.config import ExplainConfig
from builder.exemplars import EXEMPLARS_FILE
from builder.explain.offline import CorpusWords, OfflineExplainer
from builder.explain.plan import estimate_explain_cost, plan_explain
from builder.explain.prompts import INTRO, explain_request
from builder.explain.records import Exemplar, ExplainFailure, NeuronExemplars
from builder.explain.stage import LEDGER_FILE, load_neuron_exemplars
from builder.llm.cache import ResponseCache
from builder.llm.types import FailureKind
from builder.run import RunDir
from tests.explain.conftest import FAST_OPENAI

HERE = Path(__file__).resolve().parent
FAILURE_KINDS = {k.value for k in FailureKind} | {"no_evidence"}


def expected_answers(run_dir: Path, overrides: list[str], ctx_for) -> dict[tuple[int, int], tuple[str, dict]]:
    """Per neuron: its request's key and body, built independently of the stage."""
    cfg = ctx_for(run_dir, overrides).recipe.explain
    out = {}
    for n in load_neuron_exemplars(RunDir(run_dir)):
        req = explain_request(n, cfg)
        out[(n.layer, n.neuron)] = (req.key, req.body())
    return out


def check_complete(rows: list[dict], run_dir: Path) -> None:
    """Every selected neuron has exactly one row: an explanation or a typed failure."""
    selected = {(r["layer"], r["neuron"]) for r in pq.read_table(run_dir / EXEMPLARS_FILE).to_pylist()}
    assert sorted((r["layer"], r["neuron"]) for r in rows) == sorted(selected)
    for r in rows:
        if r["status"] == "ok":
            assert r["explanation"] and r["failure"] is None
        else:
            assert r["status"] == "failed" and r["explanation"] is None
            assert r["failure"].split(":", 1)[0] in FAILURE_KINDS


# -- offline ---------------------------------------------------------------------------------


def test_offline_backend_is_a_labelled_deterministic_baseline(run_copy, explain_runner):
    counts, rows = explain_runner(run_copy)
    check_complete(rows, run_copy)
    assert {r["explainer"] for r in rows} == {"offline-baseline"}
    assert {r["prompt_version"] for r in rows} == {"offline-v1"}
    assert counts["ok"] >= len(rows) // 2
    assert all('"' in r["explanation"] for r in rows if r["status"] == "ok")
    assert {r["failure"].split(":")[0] for r in rows if r["failure"]} <= {"no_evidence"}
    assert "requests_sent" not in counts and not (run_copy / "llm-cache.sqlite").exists()
    _, again = explain_runner(run_copy)
    assert again == rows


def ex(sid: str, tokens: list[str], acts: list[float]) -> Exemplar:
    return Exemplar(sid, 0, b"", tuple(tokens), tuple(acts))


def test_offline_text_neurons_name_the_tokens_that_carry_the_activation():
    explainer = OfflineExplainer(CorpusWords({}), ExplainConfig())
    red = NeuronExemplars(0, 1, "text", (
        ex("a", [" a", " red", " circle"], [0.0, 10.0, 0.5]),
        ex("b", [" the", " Red", " square"], [0.3, 8.0, 2.0]),
    ))
    assert explainer.explain_now(red) == 'the word "red"'
    two = NeuronExemplars(0, 1, "text", (ex("a", [" red", " blue"], [9.0, 7.0]),))
    assert explainer.explain_now(two) == 'the words "red" and "blue"'
    silent = NeuronExemplars(0, 1, "text", (ex("a", [" red"], [0.4]),))
    with pytest.raises(ExplainFailure, match="no_evidence"):
        explainer.explain_now(silent)


def test_offline_visual_neurons_name_over_represented_caption_words():
    texts = {f"s{i}": "a red circle" if i < 4 else ("a blue square" if i % 2 else "a green triangle")
             for i in range(40)}
    explainer = OfflineExplainer(CorpusWords(texts), ExplainConfig())
    shown = tuple(ex(f"s{i}", [], []) for i in range(4))
    assert explainer.explain_now(NeuronExemplars(0, 0, "visual", shown)) == 'images of "circle" and "red"'
    # Words as common among the shown samples as in the corpus are no evidence.
    spread = tuple(ex(f"s{i}", [], []) for i in (4, 5, 6, 7))
    with pytest.raises(ExplainFailure):
        explainer.explain_now(NeuronExemplars(0, 0, "visual", spread))
    mixed = (ex("s0", [" red"], [10.0]), *shown[1:])
    assert explainer.explain_now(NeuronExemplars(0, 0, "multimodal", mixed)) == (
        'images of "circle" and "red" and the word "red"'
    )


# -- openai backend --------------------------------------------------------------------------


def test_requests_carry_images_for_visual_neurons_and_prompts_match_categories(run_copy, openai_env,
                                                                               explain_runner, ctx_for):
    counts, rows = explain_runner(run_copy, FAST_OPENAI)
    check_complete(rows, run_copy)
    expected = expected_answers(run_copy, FAST_OPENAI, ctx_for)
    # Neurons whose prompts are identical (same samples, same rounded activations) share one request.
    distinct = {key for key, _ in expected.values()}
    assert counts["ok"] == len(rows) and counts["requests_sent"] == len(distinct) == len(openai_env.entries())
    by_key = {e.key: e.body for e in openai_env.entries()}
    images = {}
    for r in pq.read_table(run_copy / EXEMPLARS_FILE).to_pylist():
        if r["role"] == "shown":
            images.setdefault((r["layer"], r["neuron"]), []).append(r["image"]["bytes"])
    categories = Counter()
    for (layer, neuron), (key, body) in expected.items():
        category = next(r["category"] for r in rows if (r["layer"], r["neuron"]) == (layer, neuron))
        categories[category] += 1
        sent = by_key[key]
        assert sent == body  # what went over the wire is the prompt built for this neuron
        assert sent["model"] == "gpt-4o" and sent["messages"][0]["role"] == "system"
        content = sent["messages"][1]["content"]
        intro = INTRO[category].format(k=3)
        if category == "text":
            assert isinstance(content, str) and content.startswith(intro)
            assert "data:image" not in content and '\t' in content
        else:
            assert content[0] == {"type": "text", "text": intro}
            urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
            assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == images[(layer, neuron)]
            assert all(u.startswith("data:image/png;base64,") for u in urls)
            assert all(p["image_url"]["detail"] == "high" for p in content if p["type"] == "image_url")
            token_parts = [p for p in content if p["type"] == "text" and "\t" in p["text"]]
            assert len(token_parts) == (3 if category == "multimodal" else 0)
        explanation = next(r["explanation"] for r in rows if (r["layer"], r["neuron"]) == (layer, neuron))
        assert explanation == f"concept {key[:10]}"
    assert set(categories) == {"visual", "text", "multimodal"}
    assert {r["explainer"] for r in rows} == {"openai:gpt-4o"} and {r["prompt_version"] for r in rows} == {"explain-v1"}
    ledger = json.loads((run_copy / LEDGER_FILE).read_text())
    assert ledger["total"]["gpt-4o"]["answers"] == len(distinct)
    assert ledger["total"]["gpt-4o"]["dollars"] == pytest.approx(len(distinct) * (100 * 2.5 + 5 * 10) / 1e6)


def test_faults_end_in_explanations_or_typed_failures_and_a_rerun_sends_nothing(run_copy, openai_env,
                                                                                explain_runner, ctx_for):
    openai_env.faults = ["429", "500", "503", "hang", "malformed", "empty_choices", "refusal", "content_filter",
                         "sorry", "garbage", "blank"]
    counts, rows = explain_runner(run_copy, FAST_OPENAI)
    check_complete(rows, run_copy)
    expected = expected_answers(run_copy, FAST_OPENAI, ctx_for)
    distinct = {key for key, _ in expected.values()}
    # One terminal fault per request (neurons with identical prompts share theirs).
    failed = {expected[(r["layer"], r["neuron"])][0]: r["failure"].split(":")[0] for r in rows if r["failure"]}
    assert Counter(failed.values()) == Counter({"empty": 2, "refusal": 2, "content_filter": 1, "unparsable": 1})
    assert counts["ok"] + counts["failed"] == len(rows) and counts["failed"] >= 6
    assert counts["retries"] == 5 and counts["requests_sent"] == len(distinct) + 5
    for r in rows:
        if r["status"] == "ok":
            assert r["explanation"] == f"concept {expected[(r['layer'], r['neuron'])][0][:10]}"
    sent = len(openai_env.entries())
    counts2, rows2 = explain_runner(run_copy, FAST_OPENAI)
    assert len(openai_env.entries()) == sent, "the second run must send no request"
    assert rows2 == rows
    assert counts2["requests_sent"] == 0 and counts2["cache_hits"] == len(rows)


def as_sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_kill_mid_stage_then_rerun_resends_no_completed_request(run_copy, openai_env, explain_runner, ctx_for,
                                                                small, tmp_path):
    """A real process, SIGKILLed after some answers arrived; the rerun counts requests on the server."""
    openai_env.latency = 0.3
    overrides = FAST_OPENAI + ["explain.max_concurrency=2"]
    env = {**os.environ, "OPENAI_BASE_URL": openai_env.base_url, "OPENAI_API_KEY": "test-key",
           "BUILDER_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "builder", "--recipe", "tiny", "--out", str(run_copy), "--until", "explain",
           *as_sets(small + overrides)]
    with open(tmp_path / "stderr.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 120
        while len(openai_env.answered_keys()) < 5:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            assert time.monotonic() < deadline, "the stage never got going"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_copy / "explanations.parquet").exists()
    completed = ResponseCache(run_copy / "llm-cache.sqlite").keys()
    all_keys = {key for key, _ in expected_answers(run_copy, overrides, ctx_for).values()}
    # Answers written by the server but not yet received when the kill came (at most one per
    # request in flight) were never completed for the client; all others are in the cache.
    assert 5 - 2 <= len(completed) < len(all_keys)
    assert completed <= openai_env.answered_keys()

    openai_env.clear()
    openai_env.latency = 0.0
    counts, rows = explain_runner(run_copy, overrides)
    resent = [e.key for e in openai_env.entries()]
    assert not set(resent) & completed, "a request answered before the kill was sent again"
    assert sorted(resent) == sorted(all_keys - completed)
    assert counts["ok"] == len(rows) == len(expected_answers(run_copy, overrides, ctx_for))
    assert counts["requests_sent"] == len(resent)


def test_budget_cap_in_the_stage(run_copy, openai_env, explain_runner, ctx_for):
    from builder.llm.limits import Price, estimate_tokens
    from builder.llm.types import Usage

    budget = 0.004
    overrides = FAST_OPENAI + [f"explain.budget_usd={budget}"]
    counts, rows = explain_runner(run_copy, overrides)
    check_complete(rows, run_copy)
    kinds = Counter(r["failure"].split(":")[0] for r in rows if r["failure"])
    assert set(kinds) == {"budget_exhausted"} and counts["ok"] >= 1
    spent = ResponseCache(run_copy / "llm-cache.sqlite").spent("explain")
    assert 0 < spent <= budget and len(openai_env.entries()) == counts["requests_sent"]
    # Each neuron left unsent would have risked going over: its worst case did not fit.
    price = Price(2.5, 10.0)
    expected = expected_answers(run_copy, overrides, ctx_for)
    cfg = ctx_for(run_copy, overrides).recipe.explain
    for n in load_neuron_exemplars(RunDir(run_copy)):
        if next(r["status"] for r in rows if (r["layer"], r["neuron"]) == (n.layer, n.neuron)) == "failed":
            req = explain_request(n, cfg)
            assert spent + price.dollars(Usage(estimate_tokens(req).bound, req.max_tokens)) > budget
            assert req.key == expected[(n.layer, n.neuron)][0]
    first = {e.key for e in openai_env.entries()}
    # Raising the cap sends only what is missing.
    counts, rows = explain_runner(run_copy, FAST_OPENAI + ["explain.budget_usd=10"])
    assert counts["ok"] == len(rows)
    later = [e.key for e in openai_env.entries()][len(first):]
    assert later and not set(later) & first


# -- planning --------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_sends_nothing(run_copy, openai_env, explain_runner, ctx_for, small):
    from typer.testing import CliRunner

    from builder.cli import app

    args = ["--recipe", "tiny", "--out", str(run_copy), *as_sets(small + FAST_OPENAI), "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert openai_env.entries() == []
    plan = plan_explain(ctx_for(run_copy, FAST_OPENAI))
    n = plan.neurons
    assert "explain plan (nothing sent)" in result.output
    assert f"{n:,} to send, 0 answered by the cache" in result.output
    assert f"~${plan.dollars:,.2f}" in result.output
    assert plan.images == 3 * (plan.by_category["visual"] + plan.by_category["multimodal"])
    assert plan.exemplars == 3 * n and plan.output_tokens == 60 * n
    assert plan.dollars == pytest.approx((plan.input_tokens * 2.5 + plan.output_tokens * 10) / 1e6)
    assert not (run_copy / "explanations.parquet").exists()

    counts, _ = explain_runner(run_copy, FAST_OPENAI)
    assert counts["requests_sent"] == len(openai_env.entries()) <= plan.requests == n  # identical prompts: one call
    again = CliRunner().invoke(app, args)
    assert f"0 to send, {n:,} answered by the cache" in again.output
    offline = CliRunner().invoke(app, ["--recipe", "tiny", "--out", str(run_copy), *as_sets(small), "--dry-run"])
    assert "the offline baseline needs no LLM" in offline.output


def test_recipe_only_estimate_for_the_offline_plan(ctx_for, exemplar_run):
    recipe = ctx_for(exemplar_run, ["explain.backend=openai"]).recipe
    est = estimate_explain_cost(recipe, layers=4)
    assert est["explain_neurons"] == est["explain_requests"] == 4 * 3 * 2
    assert est["explain_output_tokens"] == 24 * 60
    assert est["explain_dollars"] == pytest.approx((est["explain_input_tokens"] * 2.5 + 24 * 60 * 10) / 1e6)
    offline = estimate_explain_cost(ctx_for(exemplar_run).recipe, layers=4)
    assert offline["explain_neurons"] == 24 and offline["explain_requests"] == 0 and offline["explain_dollars"] == 0


class _ScriptedExplainer:
    """Answers after a delay; neuron 2 fails typed, neuron 5 raises a bug."""

    name = "scripted"
    prompt_version = "t"

    def __init__(self):
        self.prepared: list[int] = []

    def prepare(self, neuron: NeuronExemplars) -> NeuronExemplars:
        self.prepared.append(neuron.neuron)
        return neuron

    async def explain(self, prepared: NeuronExemplars) -> str:
        import asyncio

        await asyncio.sleep(0.01 * (prepared.neuron % 3))
        if prepared.neuron == 2:
            raise ExplainFailure("no_evidence", "nothing")
        if prepared.neuron == 5 and getattr(self, "bug", False):
            raise RuntimeError("a bug")
        return f"concept {prepared.neuron}"


def test_explain_all_keeps_neuron_order_records_failures_and_stops_on_a_bug():
    import asyncio

    from builder.explain.stage import explain_all

    neurons = [NeuronExemplars(0, i, "text", ()) for i in range(40)]
    explainer = _ScriptedExplainer()
    done = []
    results = asyncio.run(explain_all(explainer, neurons, 4, on_done=lambda: done.append(1)))
    assert [r.neuron for r in results] == list(range(40)) and len(done) == 40
    assert explainer.prepared == list(range(40))  # each neuron prepared once, in order
    assert results[2].status == "failed" and results[2].explanation is None and "nothing" in results[2].failure
    assert all(r.status == "ok" and r.explanation == f"concept {r.neuron}" for r in results if r.neuron != 2)

    explainer = _ScriptedExplainer()
    explainer.bug = True
    with pytest.raises(RuntimeError, match="a bug"):
        asyncio.run(explain_all(explainer, neurons, 4))
    assert len(explainer.prepared) < 40  # the rest was cancelled, not explained
