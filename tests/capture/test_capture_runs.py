"""Capture as a whole: shards merge exactly, a killed run resumes to the same state, and a
2-process `accelerate launch` equals the 1-process run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from builder.capture.state import NeuronState, read_state_metadata
from builder.capture.stage import STATE_FILE, Shard, capture_shard
from builder.config import load_recipe
from builder.pipeline import default_stages
from builder.run import Executor, Processes

EXACT = ("max_all", "visual_count", "text_count", "visual_max", "text_max", "visual_positive", "text_positive",
         "top_value", "top_sample", "top_visual", "top_text")


def assert_same_state(a: NeuronState, b: NeuronState, sums_exact: bool = True) -> None:
    for name, tensor in a.tensors().items():
        other = b.tensors()[name]
        if name in EXACT or sums_exact:
            assert torch.equal(tensor, other), name
        else:  # sums are accumulated per batch: a different batching rounds differently
            torch.testing.assert_close(tensor, other, rtol=1e-5, atol=1e-3, msg=name)


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
    merged = first.merge(second)
    assert_same_state(merged, whole, sums_exact=False)
    # Merging is symmetric and the saved state round-trips exactly.
    assert_same_state(second.merge(first), merged)
    merged.save(out / "merged.safetensors")
    assert_same_state(NeuronState.load(out / "merged.safetensors"), merged)


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "builder", "--recipe", "tiny", "--out", str(out), "--set", "corpus.size=48",
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
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists():
            try:
                meta = read_state_metadata(checkpoint)
            except Exception:  # the rename is atomic, but be tolerant of a reader race
                meta = {}
            if meta.get("complete") == "0" and int(meta.get("batches_done", 0)) >= 4:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = int(meta["batches_done"])
                break
        time.sleep(0.01)
    assert killed_at is not None, "the capture finished before it could be killed; make it longer"
    assert not (run / "capture" / STATE_FILE).exists()
    resumed = subprocess.run(_cli(run, "--until", "capture", "-v"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    assert_same_state(NeuronState.load(run / "capture" / STATE_FILE),
                      NeuronState.load(reference / "capture" / STATE_FILE))


@pytest.mark.slow
def test_two_process_accelerate_launch_equals_one_process(tmp_path: Path) -> None:
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    one = tmp_path / "one"
    same_batches = ["--set", "capture.batch_size=1"]  # bit-identical per-sample activations in both runs
    subprocess.run([sys.executable, "-m", "builder", "--recipe", "tiny", "--out", str(one), *same_batches],
                   check=True, capture_output=True, timeout=600)
    two = tmp_path / "two"
    # On a CPU-only machine accelerate starts several processes only with --multi_gpu (gloo backend).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "builder", "--recipe", "tiny", "--out", str(two), *same_batches],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (two / "capture").glob("shard-*")) == ["shard-000-of-002.safetensors",
                                                                          "shard-001-of-002.safetensors"]
    assert_same_state(NeuronState.load(two / "capture" / STATE_FILE), NeuronState.load(one / "capture" / STATE_FILE),
                      sums_exact=False)
    import pyarrow.parquet as pq

    a = pq.read_table(one / "neurons.parquet").drop_columns(["mean_visual", "mean_text"])
    b = pq.read_table(two / "neurons.parquet").drop_columns(["mean_visual", "mean_text"])
    assert a.equals(b), "the 2-process build classifies every neuron as the 1-process build does"


def test_processes_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    p = Processes.from_env()
    assert (p.rank, p.world, p.is_main) == (3, 4, False)
    assert Shard(1, 3).indices(8) == [1, 4, 7]
