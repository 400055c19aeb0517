"""The simulate stage on the tiny recipe (planted model, offline explainer): planted concept
neurons against chance, the scoring plan, resuming, the LLM simulators through the call
layer against a local OpenAI-compatible server, typed failures, and `grounded` end to end."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.explain import fake_openai
from builder.simulate.stage import CHECKPOINT, LEDGER_FILE, SCORES_FILE, SCORES_SCHEMA, SimulateStage
from builder.simulate.text import TEXT_SYSTEM
from builder.simulate.words import content_words, matches, token_text

FAST_OPENAI = ["simulate.backend=openai", "explain.timeout_seconds=2", "explain.retry_base_seconds=0.01",
               "explain.retry_max_seconds=0.05", "explain.max_attempts=2", "explain.max_concurrency=4"]




def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _simulate(run_dir: Path, *overrides: str) -> tuple[dict[str, int], dict[tuple[int, int], dict]]:
    """Run the simulate stage alone on a run directory with recipe overrides."""
    from builder.config import load_recipe
    from builder.run import Executor

    outcome = Executor(load_recipe("tiny", list(overrides)), run_dir, [SimulateStage()]).run()[0]
    rows = {(r["layer"], r["neuron"]): r for r in pq.read_table(run_dir / SCORES_FILE).to_pylist()}
    return outcome.counts, rows


def _keep_explanations(run_dir: Path, keep) -> list[tuple[int, int]]:
    """Keep only the explanations `keep(row)` accepts (a smaller, faster scoring job)."""
    import pyarrow as pa

    from builder.io import write_parquet

    table = pq.read_table(run_dir / "explanations.parquet")
    rows = [r for r in table.to_pylist() if keep(r)]
    write_parquet(run_dir / "explanations.parquet", pa.Table.from_pylist(rows, schema=table.schema))
    return [(r["layer"], r["neuron"]) for r in rows]


def _small(r: dict) -> bool:
    """Layer 0's text neurons (the planted "red"/"blue" ones among them) and two others."""
    return r["layer"] == 0 and (r["category"] == "text" or r["neuron"] in _small.others)


def _rows(run_dir: Path, name: str) -> dict[tuple[int, int], dict]:
    return {(r["layer"], r["neuron"]): r for r in pq.read_table(run_dir / name).to_pylist()}


def _planted(run_dir: Path):
    from builder.config import load_recipe
    from builder.models.loading import model_folder
    from builder.models.planted import load_planted

    return load_planted(model_folder(load_recipe("tiny").model))


def test_planted_concept_neurons_beat_chance(simulated_run: Path):
    explanations = _rows(simulated_run, "explanations.parquet")
    scores = _rows(simulated_run, SCORES_FILE)
    assert pq.read_schema(simulated_run / SCORES_FILE).equals(SCORES_SCHEMA)
    concept = [p for p in _planted(simulated_run) if p.concept and (p.layer, p.neuron) in explanations]
    assert {p.concept for p in concept} == {"red", "blue"} and len(concept) >= 4
    for p in concept:
        key = (p.layer, p.neuron)
        assert p.concept in content_words(explanations[key]["explanation"])  # the explanation names it
        r = scores[key]
        assert r["status"] == "ok" and r["simulator"] == "text:offline-token-match-baseline"
        assert r["score"] >= 0.8 and r["text_score"] == r["score"] and r["visual_score"] is None
        assert r["baseline_score"] <= 0.2
        base = (r["baseline_layer"], r["baseline_neuron"])
        assert base != key and explanations[base]["category"] == "text"
        assert explanations[base]["explanation"] != explanations[key]["explanation"]
        assert len(r["per_sample_scores"]) == r["n_held_out"] + r["n_random"] == 10
    # every ok explanation is scored; multimodal neurons by both simulators
    assert set(scores) == {k for k, e in explanations.items() if e["status"] == "ok"}
    multimodal = [r for r in scores.values() if r["category"] == "multimodal"]
    assert multimodal and all(r["simulator"] == "visual:offline-embedding-baseline + text:offline-token-match-baseline"
                              for r in multimodal)
    assert all({p["modality"] for p in r["per_sample_scores"]} == {"visual", "text"} for r in multimodal)
    assert all(r["visual_score"] is not None and r["text_score"] is not None for r in multimodal)
    # METHOD.md 6: a multimodal neuron's score is its text simulator's (simulate.multimodal_score=text)
    assert all(r["score"] == r["text_score"] for r in multimodal)


def test_multimodal_score_rule():
    from builder.simulate.scoring import ModalityScore
    from builder.simulate.stage import NeuronScorer

    both = [ModalityScore("visual", 0.2, False, []), ModalityScore("text", 0.6, False, [])]
    assert NeuronScorer(None, None, None)._neuron_score("multimodal", both) == 0.6
    assert NeuronScorer(None, None, None, "mean")._neuron_score("multimodal", both) == pytest.approx(0.4)
    # Other categories are not affected: one modality is its score, unknown (both) the mean.
    assert NeuronScorer(None, None, None)._neuron_score("visual", both[:1]) == 0.2
    assert NeuronScorer(None, None, None)._neuron_score("unknown", both) == pytest.approx(0.4)
    undefined = [ModalityScore("visual", 0.2, False, []), ModalityScore("text", None, False, [])]
    assert NeuronScorer(None, None, None)._neuron_score("multimodal", undefined) is None


def test_plan_scores_held_out_and_random_samples(simulated_run: Path, tmp_path: Path):
    from builder.config import load_recipe
    from builder.run import Executor

    run = _copy(simulated_run, tmp_path / "run")
    ctx = Executor(load_recipe("tiny"), run, []).ctx
    tasks = {t.neuron.key: t for t in SimulateStage().plan(ctx)}
    neurons = _rows(run, "neurons.parquet")
    texts = {r["sample_id"]: r["text"] for r in pq.read_table(run / "texts.parquet").to_pylist()}
    exemplars = pq.read_table(run / "exemplars.parquet", columns=["layer", "neuron", "sample_id", "role"]).to_pylist()
    red = next(p for p in _planted(run) if p.concept == "red" and (p.layer, p.neuron) in tasks)
    task = tasks[(red.layer, red.neuron)]
    held = [s for s in task.samples if s.role == "held_out"]
    rand = [s for s in task.samples if s.role == "random"]
    expected_held = {e["sample_id"] for e in exemplars
                     if (e["layer"], e["neuron"]) == task.neuron.key and e["role"] == "held_out"}
    assert {s.sample_id for s in held} == expected_held  # never a sample the explainer saw
    assert len(rand) == ctx.recipe.simulate.random_samples
    assert not ({s.sample_id for s in rand} & set(neurons[task.neuron.key]["top_sample_ids"]))
    for s in task.samples:
        assert "".join(s.tokens).strip() == texts[s.sample_id].strip()
        assert s.heatmap.shape == (6, 6) and s.heatmap.max() == 0  # a text neuron: silent on images
        on_red = np.array([t.strip() == "red" for t in s.tokens])
        if on_red.any():
            assert s.token_activations[on_red].min() > 9
        assert s.token_activations[~on_red].max() < 6


def test_rerun_resumes_from_the_checkpoint(simulated_run: Path, tmp_path: Path):
    run = _copy(simulated_run, tmp_path / "run")
    counts, rows = _simulate(run)
    original = pq.read_table(run / SCORES_FILE)
    checkpoint = run / CHECKPOINT
    lines = checkpoint.read_text().splitlines()
    assert len(lines) == counts["neurons"] == len(rows)
    # a kill half-way: half the neurons checkpointed, no scores file yet
    checkpoint.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    (run / SCORES_FILE).unlink()
    SimulateStage().run(_ctx(run))
    assert len(checkpoint.read_text().splitlines()) == len(lines)
    assert pq.read_table(run / SCORES_FILE).equals(original)


def _ctx(run: Path, *overrides: str):
    from builder.config import load_recipe
    from builder.run import Executor

    return Executor(load_recipe("tiny", list(overrides)), run, []).ctx


def _numbered_tokens(user: str) -> list[str]:
    return [ast.literal_eval(m.group(1)) for m in re.finditer(r"(?m)^\d+\t(.*)$", user)]


def _token_match_llm(body: dict) -> str:
    """A fake simulator LLM: token matching for text prompts (so its scores must equal the
    offline baseline's), cell 1 for image prompts."""
    messages = body["messages"]
    user = messages[-1]["content"]
    if messages[0]["content"] == TEXT_SYSTEM:
        explanation = re.search(r"this neuron activates for (.*)", user).group(1)
        words = content_words(explanation)
        return json.dumps({"activations": [10 if matches(token_text(t), words) else 0 for t in _numbered_tokens(user)]})
    return '```json\n{"activations": {"1": 10, "2": 4}}\n```'


def _pick_others(run: Path) -> None:
    """One visual and one multimodal neuron of layer 0 join `_small`."""
    rows = [r for r in _rows(run, "explanations.parquet").values() if r["layer"] == 0 and r["status"] == "ok"]
    _small.others = {next(r["neuron"] for r in rows if r["category"] == c) for c in ("visual", "multimodal")}


def test_llm_simulators_through_the_call_layer(simulated_run: Path, tmp_path: Path, monkeypatch):
    fake = fake_openai
    run = _copy(simulated_run, tmp_path / "run")
    _pick_others(run)
    _keep_explanations(run, _small)
    _, offline = _simulate(run)  # the offline baseline on the same neurons, for comparison
    overrides = [*FAST_OPENAI, "simulate.visual=llm", "simulate.llm_grid=2", "simulate.model=sim-model"]
    with fake.FakeOpenAI(answer=_token_match_llm) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        counts, rows = _simulate(run, *overrides)
        sent = len(server.entries())
        assert sent > 0 and counts["requests_sent"] == sent and counts["failed"] == 0
        assert set(rows) == set(offline) and {r["category"] for r in rows.values()} == {"text", "visual", "multimodal"}
        bodies = [e.body for e in server.entries()]
        assert {b["model"] for b in bodies} == {"sim-model"} and all(b["temperature"] == 0 for b in bodies)
        images = [b for b in bodies if isinstance(b["messages"][-1]["content"], list)]
        assert images and all(b["messages"][-1]["content"][1]["image_url"]["url"].startswith("data:image/jpeg")
                              for b in images)
        for key, r in rows.items():
            assert r["status"] == "ok"
            if r["category"] == "text":  # the same predictions as the token-match baseline: the same scores
                assert r["simulator"] == "text:llm(sim-model, text-sim/1)"
                assert r["score"] == pytest.approx(offline[key]["score"], abs=1e-6)
                assert r["baseline_score"] == pytest.approx(offline[key]["baseline_score"], abs=1e-6)
            else:
                assert r["simulator"].startswith("visual:llm(sim-model, 2x2 grid, visual-sim/1)")
        ledger = json.loads((run / LEDGER_FILE).read_text())
        assert ledger["this_run"]["answered"] == sent and "sim-model" in ledger["total"]
        # a rerun from scratch sends nothing: every answer is in the call layer's cache
        (run / CHECKPOINT).unlink()
        (run / SCORES_FILE).unlink()
        SimulateStage().run(_ctx(run, *overrides))
        assert len(server.entries()) == sent
        assert pq.read_table(run / SCORES_FILE).to_pylist() == list(rows.values())


def test_the_simulate_budget_stops_sending(simulated_run: Path, tmp_path: Path, monkeypatch):
    from builder.errors import RecipeError

    run = _copy(simulated_run, tmp_path / "run")
    with pytest.raises(RecipeError, match=r"explain.prices has no entry for the simulator model 'my-model'"):
        _simulate(run, "simulate.backend=openai", "simulate.model=my-model", "simulate.budget_usd=1")
    _keep_explanations(run, lambda r: r["category"] == "text" and r["layer"] == 0)
    fake = fake_openai
    with fake.FakeOpenAI(answer=_token_match_llm) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        counts, rows = _simulate(run, *FAST_OPENAI, "simulate.visual=offline", "simulate.budget_usd=0")
        assert server.entries() == []  # nothing sent: every request's worst case exceeds $0
    assert rows and all(r["failure"].startswith("llm: budget_exhausted") for r in rows.values())
    assert counts["failed"] == len(rows) and counts["requests_sent"] == 0


def test_unparsable_and_refused_answers_are_typed_failures(simulated_run: Path, tmp_path: Path, monkeypatch):
    fake = fake_openai
    run = _copy(simulated_run, tmp_path / "run")
    _keep_explanations(run, lambda r: r["category"] == "text")
    explanations = _rows(run, "explanations.parquet")

    def answer(body: dict) -> str:
        user = body["messages"][-1]["content"]
        if 'for the word "red"' in user:
            return "Sorry, I cannot rate these tokens."
        if 'for the word "blue"' in user:
            return '{"activations": [1, 2]}'  # wrong length
        return _token_match_llm(body)

    with fake.FakeOpenAI(answer=answer) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        counts, rows = _simulate(run, *FAST_OPENAI, "simulate.visual=offline")
    red = [k for k, e in explanations.items() if e["explanation"] == 'the word "red"']
    blue = [k for k, e in explanations.items() if e["explanation"] == 'the word "blue"']
    assert red and blue
    for k in red:
        assert rows[k]["status"] == "failed" and rows[k]["failure"].startswith("unparsable: ")
        assert rows[k]["score"] is None and rows[k]["text_score"] is None and rows[k]["per_sample_scores"] == []
    for k in blue:
        assert rows[k]["status"] == "failed" and rows[k]["failure"].startswith("wrong_length: ")
    # a neuron whose baseline explanation is the unparsable one keeps its score, not its baseline
    hit = [r for r in rows.values() if (r["baseline_layer"], r["baseline_neuron"]) in red and r["status"] == "ok"]
    for r in hit:
        assert r["baseline_score"] is None and r["baseline_failure"].startswith("unparsable: ")
    assert counts["failed"] == len(red) + len(blue)
    # a refusal from the endpoint is the call layer's typed failure, kept as such
    run2 = _copy(simulated_run, tmp_path / "run2")
    _keep_explanations(run2, lambda r: r["category"] == "text" and r["layer"] == 0)
    with fake.FakeOpenAI(answer=_token_match_llm, faults=["refusal"] * 1000) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        counts, rows = _simulate(run2, *FAST_OPENAI, "simulate.visual=offline")
    text = [r for r in rows.values() if r["category"] == "text"]
    assert text and all(r["status"] == "failed" and r["failure"].startswith("llm: refusal") for r in text)
    # LLM failures are not checkpointed: a rerun asks again
    from builder.io import read_jsonl

    assert not {(r["layer"], r["neuron"]) for r in read_jsonl(run2 / CHECKPOINT)} & {(r["layer"], r["neuron"]) for r in text}


def test_grounded_simulator_in_the_stage(simulated_run: Path, tmp_path: Path, grounding_folders):
    run = _copy(simulated_run, tmp_path / "run")
    visual = next(r for r in _rows(run, "explanations.parquet").values() if r["category"] == "visual" and r["status"] == "ok")
    multimodal = next(r for r in _rows(run, "explanations.parquet").values() if r["category"] == "multimodal")
    _keep_explanations(run, lambda r: (r["layer"], r["neuron"]) in {(visual["layer"], visual["neuron"]),
                                                                    (multimodal["layer"], multimodal["neuron"])})
    detector, segmenter = grounding_folders
    counts, rows = _simulate(run, "simulate.visual=grounded", f"simulate.detector={detector}",
                             f"simulate.segmenter={segmenter}", "simulate.phrases=explanation",
                             "simulate.box_threshold=0", "simulate.text_threshold=0", "simulate.max_boxes=2",
                             "simulate.device=cpu", "simulate.random_samples=1")
    assert counts["neurons"] == 2 and counts["failed"] == 0
    for r in rows.values():
        assert r["simulator"].startswith(f"visual:grounded({Path(detector).name}, {Path(segmenter).name}, explanation as phrase)")
        visual = [p for p in r["per_sample_scores"] if p["modality"] == "visual"]
        assert len(visual) == r["n_held_out"] + r["n_random"]
        assert r["status"] in ("ok", "undefined")


def test_scores_join_the_explanations_config(simulated_run: Path):
    from builder.simulate.publish import PUBLISHED_SCORE_COLUMNS, explanations_with_scores

    table = explanations_with_scores(simulated_run)
    explanations = pq.read_table(simulated_run / "explanations.parquet")
    assert table.num_rows == explanations.num_rows
    assert table.column_names == explanations.column_names + list(PUBLISHED_SCORE_COLUMNS)
    scores = _rows(simulated_run, SCORES_FILE)
    for r in table.to_pylist():
        s = scores.get((r["layer"], r["neuron"]))
        if r["status"] != "ok":
            assert s is None and r["score"] is None and r["per_sample_scores"] is None
        else:
            assert all(r[published] == s[source] for published, source in PUBLISHED_SCORE_COLUMNS.items())
    # the published features accept it as it is
    from builder.package.features import EXPLANATIONS

    table.select(list(EXPLANATIONS)).cast(EXPLANATIONS.arrow_schema)


def test_card_reports_scores_against_baselines(simulated_run: Path, tmp_path: Path):
    from builder.package import PackageStage

    run = _copy(simulated_run, tmp_path / "run")
    PackageStage().run(_ctx(run))
    card = (run / "dataset" / "README.md").read_text()
    scores = pq.read_table(run / SCORES_FILE).to_pylist()
    text = [r for r in scores if r["category"] == "text"]
    q = lambda v: " / ".join(f"{x:.3f}" for x in np.quantile(v, [0.25, 0.5, 0.75]))  # noqa: E731
    row = next(line for line in card.splitlines() if line.startswith("| text |") and " / " in line)
    assert q([r["score"] for r in text]) in row and q([r["baseline_score"] for r in text]) in row
    assert "| mean score | score quartiles | mean baseline | baseline quartiles | beats baseline |" in card
    # the published explanations config carries the scores
    published = pq.read_table(next((run / "dataset" / "explanations").glob("*.parquet"))).to_pylist()
    by_key = {(r["layer"], r["neuron"]): r for r in published}
    for r in scores:
        p = by_key[(r["layer"], r["neuron"])]
        assert p["score"] == pytest.approx(r["score"]) and p["simulator"] == r["simulator"]
        assert len(p["per_sample_scores"]) == len(r["per_sample_scores"])
