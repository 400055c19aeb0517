"""The text stage: prompt format, generated descriptions, their on-disk cache and resuming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from transformers import LlavaForConditionalGeneration

from builder.config import load_recipe
from builder.corpus.shapes import shape_sample
from builder.generate import DESCRIPTIONS_FILE, describe_batch
from builder.io import read_jsonl
from builder.pipeline import default_stages
from builder.run import Executor
from builder.text import prompt_prefix, read_texts, teacher_forced_text

PROMPT = "Could you describe the image?"


def generate_overrides(size: int, batch_size: int, max_new_tokens: int = 8) -> list[str]:
    return [
        "text.source=generate",
        f"text.batch_size={batch_size}",
        f"text.max_new_tokens={max_new_tokens}",
        f"corpus.size={size}",
    ]


@pytest.fixture
def count_generate(monkeypatch):
    """Record the batch size and the options of every `generate` call of the tiny LLaVA."""
    calls: list[dict] = []
    original = LlavaForConditionalGeneration.generate

    def counted(self, *args, **kwargs):
        calls.append({"batch": int(kwargs["input_ids"].shape[0]), **{k: kwargs.get(k) for k in ("do_sample", "use_cache")}})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", counted)
    return calls


def cache_rows(run_dir) -> list[dict]:
    return read_jsonl(run_dir / DESCRIPTIONS_FILE)  # a line torn by the kill is not a row


def test_llava_chat_format(tiny_vlm):
    prefix = prompt_prefix(tiny_vlm.processor, PROMPT)
    assert prefix == "USER: <image>\nCould you describe the image? ASSISTANT:"
    # Without a chat template: LLaVA-1.5's format with the processor's image token.
    bare = SimpleNamespace(chat_template=None, image_token="<img>")
    assert prompt_prefix(bare, "Describe.") == "USER: <img>\nDescribe. ASSISTANT:"
    full, start = teacher_forced_text(tiny_vlm.processor, PROMPT, "a red circle")
    assert full == prefix + " a red circle" and full[start:] == "a red circle"
    assert teacher_forced_text(tiny_vlm.processor, PROMPT, "") == (prefix, len(prefix))


def test_generated_descriptions_reach_the_samples_config(tmp_path, count_generate):
    ex = Executor(load_recipe("tiny", generate_overrides(size=10, batch_size=4)), tmp_path / "run", default_stages())
    ex.run()
    # Batched greedy generation with the KV cache: ceil(10 / 4) calls.
    assert [c["batch"] for c in count_generate] == [4, 4, 2]
    assert all(c["do_sample"] is False and c["use_cache"] is True for c in count_generate)
    rows = cache_rows(tmp_path / "run")
    assert len(rows) == 10 and len({r["sample_id"] for r in rows}) == 10
    assert all(0 < r["new_tokens"] <= 8 for r in rows if r["text"])
    published = pq.read_table(tmp_path / "run" / "dataset" / "samples").to_pylist()
    assert {r["text_source"] for r in published} == {"generate"}
    cached = {r["sample_id"]: r["text"] for r in rows}
    assert {r["sample_id"]: r["text"] for r in published} == cached
    assert all(r["text"] != r["caption"] for r in published)  # the model's words, not the captions
    assert not any(tok in t for t in cached.values() for tok in ("</s>", "<pad>", "<image>", "<s>"))
    assert ex.manifest.stages["text"].counts == {"texts": 10, "generated": 10, "empty": sum(not t for t in cached.values())}


def test_changed_prompt_regenerates_and_the_old_descriptions_stay_cached(tmp_path, count_generate):
    base = generate_overrides(size=6, batch_size=3)
    Executor(load_recipe("tiny", base), tmp_path, default_stages()).run(until="text")
    assert len(count_generate) == 2
    first = read_texts(tmp_path / "texts.parquet")
    Executor(load_recipe("tiny", base + ["text.prompt=What is in this picture?"]), tmp_path, default_stages()).run(until="text")
    assert len(count_generate) == 4 and len(cache_rows(tmp_path)) == 12
    # Back to the first prompt, with another batch size: every description comes from the cache.
    Executor(load_recipe("tiny", base[:1] + base[2:] + ["text.batch_size=5"]), tmp_path, default_stages()).run(until="text")
    assert len(count_generate) == 4
    assert read_texts(tmp_path / "texts.parquet") == first


CHILD = textwrap.dedent(
    """
    import sys, time
    from transformers import LlavaForConditionalGeneration
    original = LlavaForConditionalGeneration.generate
    def slow(self, *args, **kwargs):
        time.sleep(0.4)  # give the parent time to kill us between batches
        return original(self, *args, **kwargs)
    LlavaForConditionalGeneration.generate = slow
    from builder.config import load_recipe
    from builder.pipeline import default_stages
    from builder.run import Executor
    Executor(load_recipe("tiny", sys.argv[2:]), sys.argv[1], default_stages()).run(until="text")
    """
)


def test_killed_generation_resumes_without_regenerating(tmp_path, tiny_vlm, count_generate):
    overrides = generate_overrides(size=16, batch_size=2)
    run_dir = tmp_path / "run"
    env = {**os.environ, "BUILDER_PROGRESS": "0"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), *overrides], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(cache_rows(run_dir)) < 4 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    before = {r["sample_id"]: r["text"] for r in cache_rows(run_dir)}
    assert 4 <= len(before) < 16, "the kill must land during generation"
    assert not (run_dir / "texts.parquet").exists()

    Executor(load_recipe("tiny", overrides), run_dir, default_stages()).run(until="text")
    # Only the descriptions that were missing are generated, in batches of two.
    assert sum(c["batch"] for c in count_generate) == 16 - len(before)
    rows = cache_rows(run_dir)
    assert len(rows) == 16 and len({r["sample_id"] for r in rows}) == 16
    texts = read_texts(run_dir / "texts.parquet")
    assert len(texts) == 16 and all(texts[k].text == v for k, v in before.items())


def test_an_empty_generation_is_kept_and_counted(tmp_path, tiny_vlm, monkeypatch):
    original = LlavaForConditionalGeneration.generate
    eos = tiny_vlm.processor.tokenizer.eos_token_id

    def first_row_ends_at_once(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out[0, kwargs["input_ids"].shape[1]] = eos
        return out

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", first_row_ends_at_once)
    prefix = prompt_prefix(tiny_vlm.processor, PROMPT)
    images = [shape_sample(0)[0], shape_sample(1)[0]]
    made = describe_batch(tiny_vlm, images, prefix, max_new_tokens=5)
    assert made[0] == ("", 0, True)
    assert made[1][1] == 5 and made[1][2] is False and made[1][0]

    # Through the build: the sample stays, without description tokens, and capture runs.
    ex = Executor(load_recipe("tiny", generate_overrides(size=6, batch_size=3)), tmp_path, default_stages())
    ex.run(until="capture")
    texts = read_texts(tmp_path / "texts.parquet")
    assert len(texts) == 6 and sum(not t.text for t in texts.values()) == 2
    assert ex.manifest.stages["text"].counts["empty"] == 2
    assert ex.manifest.stages["capture"].counts["visual_positions"] == 6 * 36



def test_a_torn_cache_line_does_not_swallow_the_next_row(tmp_path):
    from builder.generate import end_torn_line
    from builder.io import append_jsonl

    path = tmp_path / DESCRIPTIONS_FILE
    path.write_text('{"sample_id": "a"}\n{"sample_id": "b", "te')  # killed mid-append
    end_torn_line(path)
    append_jsonl(path, [{"sample_id": "c"}])
    assert [r["sample_id"] for r in read_jsonl(path)] == ["a", "c"]
    end_torn_line(path)  # a whole file is left alone
    assert path.read_text().endswith('{"sample_id": "c"}\n') and path.read_text().count("\n") == 3
