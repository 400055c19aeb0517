"""Batch sizes from free GPU memory: `capture.batch_size: auto` and `text.batch_size: auto`.

The size is worked out from the language model's shape before the first batch, not by
trial: an out-of-memory error half-way through a forward pass would leave the layers
before it folded into the capture state, so a capture batch cannot simply be retried
smaller. The per-sample estimates below count what is alive at the peak of one decoder
layer, with SDPA attention (no T x T score matrix) and no KV cache in the capture pass:

capture, per token of the padded sequence
    model:  8 x hidden   (residual stream, norm output, q/k/v/attention output)
          + 3 x width    (gate, SiLU(gate), up of the MLP)          x the model's bytes per value
    hooks:  the float32 copy of the layer's [T, width] activations, the same again for the
            modality gather, and the top-m sort's values and int64 indices: 20 x width bytes
generation, per sample
    the KV cache for prompt + new tokens (2 x layers x hidden values per token), plus the
    prefill's model activations for the prompt (as above, without the hooks)

`AUTO_MEMORY_FRACTION` of the free memory is used, leaving room for the allocator's
fragmentation, the vision tower and the DataLoader's pinned buffers. Without CUDA, `auto`
is `CPU_BATCH_SIZE`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("builder")

AUTO_MEMORY_FRACTION = 0.7
CPU_BATCH_SIZE = 8
MAX_AUTO_BATCH = 256
"""Beyond this a bigger batch no longer speeds a 7B model up, and a killed run loses more."""


@dataclass(frozen=True)
class LanguageModelShape:
    """What the memory of a forward pass scales with."""

    layers: int
    hidden: int
    width: int
    """FFN neurons per layer."""
    bytes_per_value: int
    """2 for bf16 / fp16, 4 for fp32."""


def model_bytes_per_token(shape: LanguageModelShape) -> int:
    """The model's live activations per token at a decoder layer's peak (no KV cache)."""
    return (8 * shape.hidden + 3 * shape.width) * shape.bytes_per_value


def kv_bytes_per_token(shape: LanguageModelShape) -> int:
    """The KV cache of one token: a key and a value of `hidden` values in every layer."""
    return 2 * shape.layers * shape.hidden * shape.bytes_per_value


def capture_bytes_per_sample(shape: LanguageModelShape, tokens: int) -> int:
    """Peak bytes one sample of `tokens` positions adds to a capture forward pass."""
    hooks = 20 * shape.width
    return tokens * (model_bytes_per_token(shape) + hooks)


def generate_bytes_per_sample(shape: LanguageModelShape, prompt_tokens: int, new_tokens: int) -> int:
    """Peak bytes one sample adds to a batched greedy generation with the KV cache."""
    return kv_bytes_per_token(shape) * (prompt_tokens + new_tokens) + prompt_tokens * model_bytes_per_token(shape)


def batch_size_for(free_bytes: int, bytes_per_sample: int, fraction: float = AUTO_MEMORY_FRACTION,
                   cap: int = MAX_AUTO_BATCH) -> int:
    """The largest batch whose estimate fits `fraction` of `free_bytes` (at least 1, at most `cap`)."""
    if bytes_per_sample <= 0:
        raise ValueError("bytes_per_sample must be positive")
    return max(1, min(cap, math.floor(free_bytes * fraction / bytes_per_sample)))


@dataclass(frozen=True)
class BatchChoice:
    size: int
    reason: str
    """How it was chosen (logged and recorded in the manifest)."""


def choose_batch_size(setting: int | Literal["auto"], device: Any,
                      bytes_per_sample: Callable[[], int]) -> BatchChoice:
    """`setting` itself, or for `auto` the size that fits the device's free memory now
    (`bytes_per_sample` is only called then)."""
    if setting != "auto":
        return BatchChoice(int(setting), "recipe")
    import torch

    if not str(device).startswith("cuda"):
        return BatchChoice(CPU_BATCH_SIZE, f"auto on {device}: the CPU default")
    free, total = torch.cuda.mem_get_info(torch.device(device))
    per_sample = bytes_per_sample()
    size = batch_size_for(free, per_sample)
    reason = (f"auto: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free on {device}, "
              f"~{per_sample / 2**20:.0f} MiB a sample")
    log.info("batch size %d (%s)", size, reason)
    return BatchChoice(size, reason)


def shape_of(model: Any) -> LanguageModelShape:
    """The language model's shape from a loaded model's config."""
    config = model.config
    text = getattr(config, "text_config", config)
    bytes_per_value = next(model.parameters()).element_size()
    return LanguageModelShape(text.num_hidden_layers, text.hidden_size, text.intermediate_size, bytes_per_value)


def measure_peak_bytes(run: Callable[[], object], device: Any) -> int:
    """Peak bytes allocated above what was live when `run()` started: the CUDA allocator's
    peak on a GPU, else the running sum of the CPU allocations the torch profiler records.
    How `benchmarks/capture.py` and the tests check the estimates above."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak
