"""Capture overhead: the bare forward pass against the capturing forward pass, same batches.

Both passes run `model.model` as the capture stage does (no LM head: capture never needs
logits; no KV cache); the capturing one
also has the capture hooks folding every layer's activations into a `NeuronState`, exactly
as the capture stage does. Each batch is run both ways back to back (alternating which goes
first), so a shared machine's noise hits both alike. Each corpus size runs in a fresh
subprocess, so its peak RSS is its own.

Shapes (random weights, built from configs in process; nothing is downloaded):
- `standin` (CPU): LLaVA-like proportions: a 336 px / patch 14 image (576 image tokens),
  a small CLIP tower, and a LLaMA language model wide enough that matmuls dominate
  (hidden 1024, FFN 2816, 4 layers); descriptions of 140-200 tokens (760 tokens a sample);
  batches of 4; corpus sizes 8 and 32.
- `llava15-7b` (GPU only): the real LLaVA-1.5-7B shape (CLIP ViT-L/14-336, 32 x 4096 LLaMA
  layers with 11,008 FFN neurons), float16; batches of 16; corpus sizes 64 and 192.
Both keep N = 50 top samples and m = 8 order statistics per modality, as the paper's recipe.

    python benchmarks/capture.py [--shape auto|standin|llava15-7b] [--sizes 8 32] [--batch-size 4]
                                 [--hook act_fn|down_proj_input] [--threads 1]

Prints JSON per shape: `overhead_ratio` (capturing time / bare time over all measured
batches of both sizes), `overhead_ratio_median` (median of the per-batch ratios, robust to
bursts of load from other processes), `overhead_ratio_cpu` (the same with process CPU
time), `capture_samples_per_second` (the figure for `plan.capture_samples_per_second`),
`peak_rss_mb` per corpus size, `rss_growth` (peak RSS of the larger size over the smaller),
`memory_estimate_over_measured` (the `batch_size: auto` estimate of one batch over its
measured peak: CUDA allocator on a GPU, torch profiler on a CPU; >= 1 means the estimate
is safe) and, on a GPU, `peak_gpu_mb` per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from builder.models.builtin import COLOURS
from builder.models.builtin import SHAPES as SHAPE_WORDS


@dataclass(frozen=True)
class Shape:
    """Architecture of the benchmarked model."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    intermediate: int
    """FFN neurons per layer (D)."""
    vocab_size: int
    dtype: str
    device: str
    batch_size: int
    sizes: tuple[int, int]
    """The two corpus sizes (samples) measured."""


SHAPES = {
    "standin": Shape(336, 14, 256, 2, 4, 1024, 1024, 4, 16, 2816, 0, "float32", "cpu", 4, (8, 32)),
    "llava15-7b": Shape(336, 14, 1024, 24, 16, 4096, 4096, 32, 32, 11008, 32064, "float16", "cuda", 16, (64, 192)),
}
PROMPT = "Could you describe the image?"
TOP_N, TOP_M = 50, 8
WARMUP = 2
"""Batches run both ways before timing starts (allocator and caches settle)."""


def build(shape: Shape):
    """Model (random weights, eval mode, on the shape's device) and a LLaVA processor."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from builder.models.builtin import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, TinyLlavaSpec, build_tokenizer

    tokenizer = build_tokenizer(TinyLlavaSpec())
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size,
                              projection_dim=shape.vision_hidden)
    text = LlamaConfig(hidden_size=shape.text_hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_heads, vocab_size=max(shape.vocab_size, len(tokenizer)),
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id)
    grid = shape.image_size // shape.patch_size
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=grid**2,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    with torch.device(shape.device):  # weights are made where they run (7B does not fit in host RAM twice)
        model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, shape.dtype)).eval()
    size = {"shortest_edge": shape.image_size}
    crop = {"height": shape.image_size, "width": shape.image_size}
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tokenizer,
                               patch_size=shape.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


WORDS = [*COLOURS, *SHAPE_WORDS, "a", "the", "and", "with", "of", "on"]
"""Words that are one token each for the built-in tokenizer."""


def batches(processor, image_token_id: int, samples: int, batch_size: int):
    """Encoded batches of shapes images with LLaVA-length descriptions, made on the fly.

    Descriptions are 140-200 one-token words (~760 tokens a sample, as in LLaVA-1.5's corpus), different within a batch (as generated ones
    are) and the same lengths in every batch, so that every batch has the same padded shape
    and the two corpus sizes differ only in how many batches they have.
    """
    from builder.capture.inputs import encode_batch
    from builder.corpus.shapes import shape_sample

    for start in range(0, samples, batch_size):
        idx = list(range(start, min(start + batch_size, samples)))
        images = [shape_sample(i)[0] for i in idx]
        lengths = [200 - 60 * (i % batch_size) // max(batch_size - 1, 1) for i in idx]
        texts = [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) for i, n in zip(idx, lengths)]
        # Right padding, as the capture stage asks for.
        yield encode_batch(processor, images, texts, PROMPT, image_token_id, idx, padding_side="right")


def measure(shape: Shape, samples: int, hook: str) -> dict:
    """Time both passes over `samples` samples, after WARMUP batches of each."""
    from builder.capture.hooks import neuron_hooks
    from builder.capture.memory import capture_bytes_per_sample, measure_peak_bytes
    from builder.capture.memory import shape_of as lm_shape
    from builder.capture.stage import _base_forward, to_device
    from builder.capture.state import BatchPositions, NeuronState, WorkBuffer
    from builder.models.loading import find_decoder_mlps

    model, processor = build(shape)
    image_token_id = model.config.image_token_index
    mlps = find_decoder_mlps(model)
    device = torch.device(shape.device)
    state = NeuronState.empty(len(mlps), mlps[0].width, TOP_N, TOP_M, device)
    current: dict[str, BatchPositions] = {}
    work = WorkBuffer()

    def sink(layer: int, activations: torch.Tensor) -> None:
        state.update_layer(layer, activations, current["positions"])

    def timed(fn) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    forward = _base_forward(model)  # as the capture stage runs it: no LM head, no KV cache

    def bare(batch) -> tuple[float, float]:
        return timed(lambda: forward(**to_device(batch, device).inputs))

    def capturing(batch) -> tuple[float, float]:
        def run() -> None:
            # What the capture stage does per batch: positions once, then the hooked forward.
            current["positions"] = BatchPositions.from_masks(batch.visual_mask, batch.text_mask,
                                                             batch.sample_index, work).to(device)
            with neuron_hooks(mlps, hook, sink):
                forward(**to_device(batch, device).inputs)

        return timed(run)

    with torch.inference_mode():
        for batch in batches(processor, image_token_id, WARMUP * shape.batch_size, shape.batch_size):
            bare(batch)
            capturing(batch)
        state = NeuronState.empty(len(mlps), mlps[0].width, TOP_N, TOP_M, device)  # warm-up not counted
        walls: dict[str, list[float]] = {"bare": [], "capture": []}
        cpus: dict[str, list[float]] = {"bare": [], "capture": []}
        tokens = []
        for i, batch in enumerate(batches(processor, image_token_id, samples, shape.batch_size)):
            order = [("bare", bare), ("capture", capturing)]
            for name, fn in order[:: 1 if i % 2 == 0 else -1]:  # alternate which pass goes first
                wall, cpu = fn(batch)
                walls[name].append(wall)
                cpus[name].append(cpu)
            tokens.append(int(batch.inputs["attention_mask"].sum()))
        image_tokens = (shape.image_size // shape.patch_size) ** 2
        assert int(state.visual_count[0]) == samples * image_tokens, "every image position was recorded"
        # `batch_size: auto`'s estimate against the measured peak of one more capturing batch.
        rows, width = batch.inputs["input_ids"].shape
        peak_bytes = measure_peak_bytes(lambda: capturing(batch), device)
        estimate_bytes = rows * capture_bytes_per_sample(lm_shape(model), width)
    bare_s, capture_s = sum(walls["bare"]), sum(walls["capture"])
    out = {
        "samples": samples,
        "batches": len(walls["bare"]),
        "tokens_per_sample": round(sum(tokens) / samples, 1),
        "bare_seconds": round(bare_s, 3),
        "capture_seconds": round(capture_s, 3),
        "overhead_ratio": round(capture_s / bare_s, 4),
        "capture_samples_per_second": round(samples / capture_s, 3),
        "overhead_ratio_cpu": round(sum(cpus["capture"]) / sum(cpus["bare"]), 4),
        "batch_ratios": [round(c / b, 4) for b, c in zip(walls["bare"], walls["capture"])],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "batch_peak_mb": round(peak_bytes / 2**20, 1),
        "batch_estimate_mb": round(estimate_bytes / 2**20, 1),
        "memory_estimate_over_measured": round(estimate_bytes / peak_bytes, 3),
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def run_shape(name: str, shape: Shape, hook: str, threads: int) -> dict:
    """Both corpus sizes, each in a fresh subprocess."""
    # glibc's adaptive mmap threshold keeps freed activation buffers in the heap, so peak RSS
    # creeps up with the number of batches even for a bare forward; a fixed threshold returns
    # them, and peak RSS then measures what is alive (the same for both passes).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    runs = []
    for samples in shape.sizes:
        cmd = [sys.executable, __file__, "--worker", name, "--samples", str(samples), "--hook", hook,
               "--batch-size", str(shape.batch_size), "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise SystemExit(f"benchmark worker failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    small, large = runs
    ratios = [r for run in runs for r in run["batch_ratios"]]
    return {
        "shape": name,
        "architecture": asdict(shape),
        "hook": hook,
        "torch_threads": runs[0]["torch_threads"],
        "top_n": TOP_N,
        "top_m": TOP_M,
        "overhead_ratio": round(sum(r["capture_seconds"] for r in runs) / sum(r["bare_seconds"] for r in runs), 4),
        "overhead_ratio_median": round(statistics.median(ratios), 4),
        "overhead_ratio_cpu": round(statistics.mean(r["overhead_ratio_cpu"] for r in runs), 4),
        "capture_samples_per_second": large["capture_samples_per_second"],
        "peak_rss_mb": {str(r["samples"]): r["peak_rss_mb"] for r in runs},
        "memory_estimate_over_measured": large["memory_estimate_over_measured"],
        "rss_growth": round(large["peak_rss_mb"] / small["peak_rss_mb"], 4),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto",
                        help="auto: the CPU stand-in, and the 7B shape too when a GPU is present")
    parser.add_argument("--sizes", type=int, nargs=2, default=None, help="the two corpus sizes (samples)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--hook", choices=["act_fn", "down_proj_input"], default="act_fn")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per worker (0: torch's default). One thread gives steady "
                             "figures on a CPU that other processes share; the GPU shape ignores it")
    parser.add_argument("--worker", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    def shape_of(name: str) -> Shape:
        shape = SHAPES[name]
        overrides = {k: v for k, v in (("sizes", tuple(args.sizes) if args.sizes else None),
                                       ("batch_size", args.batch_size)) if v is not None}
        return Shape(**{**asdict(shape), **overrides})

    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = measure(shape_of(args.worker), args.samples, args.hook)
        print(json.dumps({**result, "torch_threads": torch.get_num_threads()}))
        return
    print_results("capture", args.shape, lambda name: run_shape(name, shape_of(name), args.hook, args.threads))


def print_results(benchmark: str, shape: str, run: Callable[[str], dict]) -> None:
    """`run` for each shape asked for (`auto`: the CPU stand-in, and the 7B shape too when a
    GPU is present; a GPU shape without one is skipped), printed as one JSON document."""
    names = ["standin", "llava15-7b"] if shape == "auto" else [shape]
    results = {}
    for name in names:
        if SHAPES[name].device == "cuda" and not torch.cuda.is_available():
            results[name] = {"skipped": "no CUDA device"}
            continue
        results[name] = run(name)
    print(json.dumps({
        "benchmark": benchmark,
        "results": results,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
