"""Capture as a whole: shards merge into the one-pass state, a SIGKILLed run resumes to the
identical state, and a 2-process `accelerate launch` of the CLI equals the 1-process run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from builder.capture.stage import STATE_FILE, Shard, capture_shard
from builder.capture.state import NeuronState, read_state_metadata
from builder.config import load_recipe
from builder.pipeline import default_stages
from builder.run import Executor, Processes

SUMS = ("visual_sum", "visual_sumsq", "text_sum", "text_sumsq")


def assert_same_state(a: NeuronState, b: NeuronState, sums_exact: bool = True) -> None:
    """Equal tensor for tensor; with sums_exact=False the float64 sums may differ by their
    addition order only (1e-12 relative), everything else is still bit-identical."""
    for name, tensor in a.tensors().items():
        other = b.tensors()[name]
        if name in SUMS and not sums_exact:
            torch.testing.assert_close(tensor, other, rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert torch.equal(tensor, other), name


def _prepared(tmp_path: Path, overrides: list[str]) -> Executor:
    executor = Executor(load_recipe("tiny", ["corpus.size=24", "classify.top_n=6", *overrides]), tmp_path,
                        default_stages())
    executor.run(until="text")
    return executor


def test_two_shards_merge_into_one_pass(tmp_path: Path) -> None:
    # One sample per batch: each sample's activations are then bit-identical whichever shard
    # it is in (batch shape and padding change floating-point rounding, not the maths).
    ex = _prepared(tmp_path, ["capture.batch_size=1"])
    out = tmp_path / "capture"
    whole = capture_shard(ex.ctx, Shard(0, 1), out / "whole.safetensors")
    first = capture_shard(ex.ctx, Shard(0, 2), out / "a.safetensors")
    second = capture_shard(ex.ctx, Shard(1, 2), out / "b.safetensors")
    assert int(first.visual_count[0]) + int(second.visual_count[0]) == int(whole.visual_count[0])
    assert set(first.top_sample.flatten().tolist()) <= set(range(0, 24, 2)) | {-1}
    merged = first.merge(second)
    assert_same_state(merged, whole, sums_exact=False)
    assert_same_state(second.merge(first), merged, sums_exact=False)
    # The saved shard checkpoints hold the same states, and a saved state round-trips exactly.
    assert_same_state(NeuronState.load(out / "a.safetensors"), first)
    merged.save(out / "merged.safetensors")
    assert_same_state(NeuronState.load(out / "merged.safetensors"), merged)


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "builder", "--recipe", "tiny", "--out", str(out), "--set", "corpus.size=96",
            "--set", "capture.batch_size=1", "--set", "capture.checkpoint_every=2", *extra]


@pytest.mark.slow
def test_killed_capture_resumes_to_identical_state(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_cli(reference, "--until", "capture"), check=True, capture_output=True, timeout=600)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run, "--until", "capture"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "capture" / Shard(0, 1).checkpoint_name
    deadline = time.monotonic() + 300
    killed_at = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.exists():
                meta = read_state_metadata(checkpoint)  # complete files only: they are renamed into place
                if meta.get("complete") == "0" and int(meta["batches_done"]) >= 4:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed_at = int(meta["batches_done"])
                    break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed_at is not None, "the capture finished before it could be killed; make it longer"
    assert not (run / "capture" / STATE_FILE).exists()
    resumed = subprocess.run(_cli(run, "--until", "capture", "-v"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    assert not list((run / "capture").glob(".*.tmp"))  # no torn checkpoint left behind
    assert_same_state(NeuronState.load(run / "capture" / STATE_FILE),
                      NeuronState.load(reference / "capture" / STATE_FILE))


def _launch_two(out: Path, *extra: str) -> subprocess.CompletedProcess:
    # accelerate 1.x starts one process per `--num_processes` on a CPU-only machine only
    # with --multi_gpu (torch.distributed.run, gloo); `--cpu` runs a single process.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "-m", "builder", "--recipe", "tiny", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )


def _one_and_two_processes(tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    """The tiny build with `args` in one process (`one/`) and in a 2-process launch (`two/`)."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "builder", "--recipe", "tiny", "--out", str(one), *args],
                   check=True, capture_output=True, timeout=600)
    result = _launch_two(two, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return one, two


@pytest.mark.slow
def test_two_process_accelerate_launch_equals_one_process(tmp_path: Path) -> None:
    args = ["--set", "capture.batch_size=1", "--until", "classify"]  # bit-identical per-sample activations
    one, two = _one_and_two_processes(tmp_path, args)
    assert sorted(p.name for p in (two / "capture").glob("shard-*")) == ["shard-000-of-002.safetensors",
                                                                          "shard-001-of-002.safetensors"]
    assert read_state_metadata(two / "capture" / STATE_FILE)["shards"] == "2"
    shard = NeuronState.load(two / "capture" / "shard-001-of-002.safetensors")
    assert set(shard.top_sample.flatten().tolist()) <= set(range(1, 96, 2)) | {-1}  # its own half only
    assert_same_state(NeuronState.load(two / "capture" / STATE_FILE), NeuronState.load(one / "capture" / STATE_FILE),
                      sums_exact=False)
    a = pq.read_table(one / "neurons.parquet").drop_columns(["mean_visual", "mean_text"])
    b = pq.read_table(two / "neurons.parquet").drop_columns(["mean_visual", "mean_text"])
    assert a.equals(b), "the 2-process build classifies every neuron as the 1-process build does"
    # A rerun of the same launch finds every stage done on every process (and does not hang).
    before = json.loads((two / "manifest.json").read_text())["stages"]
    again = _launch_two(two, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not re.search(r"stage \w+ +running", again.stderr)
    assert again.stderr.count("stage capture     up to date") == 2  # both processes
    assert json.loads((two / "manifest.json").read_text())["stages"] == before


@pytest.mark.slow
def test_two_process_generation_shares_the_images_out(tmp_path: Path) -> None:
    # One image per generate call: greedy decoding is then identical whichever process runs it.
    args = ["--set", "corpus.size=24", "--set", "text.source=generate", "--set", "text.max_new_tokens=6",
            "--set", "text.batch_size=1", "--until", "capture"]
    one, two = _one_and_two_processes(tmp_path, args)
    shares = [len((two / f"descriptions-{r}-of-2.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert shares == [12, 12] and not (two / "descriptions.jsonl").exists()
    assert pq.read_table(two / "texts.parquet").equals(pq.read_table(one / "texts.parquet"))
    # A later single-process run finds every description in the two files and generates none.
    rerun = subprocess.run([sys.executable, "-m", "builder", "--recipe", "tiny", "--out", str(two), *args,
                            "--force", "text", "-v"], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "24 of 24 descriptions cached" in rerun.stderr and not (two / "descriptions.jsonl").exists()


def test_processes_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    p = Processes.from_env()
    assert (p.rank, p.world, p.is_main) == (3, 4, False)
    assert Shard(1, 3).indices(8) == [1, 4, 7]
