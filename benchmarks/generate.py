"""Generation throughput: batched greedy decoding with the KV cache, as the text stage runs it.

Builds the model of `benchmarks/capture.py`'s shapes (random weights, nothing downloaded),
then describes the same images through `builder.generate.describe_batch` at several batch
sizes, each generating exactly `--new-tokens` tokens a row (`min_new_tokens` holds off the
end of turn random weights would emit at random). The baseline is batch size 1 in the same
run; `speedup` is each batch size's new tokens per second over it.

- `standin` (CPU): 576 image tokens, a 4-layer LLaMA of hidden 1024; batch sizes 1, 2, 4.
- `llava15-7b` (GPU only): the LLaVA-1.5-7B shape in float16; batch sizes 1, 16, 64 and the
  one `text.batch_size: auto` chooses on the device.

Prints JSON: per batch size the seconds, new tokens per second (`tokens_per_second`, the
figure for `plan.generate_tokens_per_second` at the batch size the recipe uses) and the
speedup over batch size 1.

    python benchmarks/generate.py [--shape auto|standin|llava15-7b] [--new-tokens 32]
                                  [--batch-sizes 1 2 4] [--repeats 2] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture import PROMPT, SHAPES, build, print_results  # noqa: E402  (the capture benchmark's shapes)

DEFAULTS = {"standin": ((1, 2, 4), 32), "llava15-7b": ((1, 16, 64), 256)}


def measure(name: str, batch_sizes: list[int] | None, new_tokens: int | None, repeats: int) -> dict:
    from builder.corpus.shapes import shape_sample
    from builder.generate import describe_batch, generate_batch_size
    from builder.text import prompt_prefix

    shape = SHAPES[name]
    sizes, tokens = DEFAULTS[name]
    sizes = list(batch_sizes or sizes)
    new_tokens = new_tokens or tokens
    model, processor = build(shape)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    vlm = SimpleNamespace(model=model, processor=processor, device=torch.device(shape.device))
    prefix = prompt_prefix(processor, PROMPT)
    auto = None
    if shape.device == "cuda":
        auto = generate_batch_size(vlm, prefix, "auto", new_tokens)
        sizes = sorted({*sizes, auto})

    def run(batch: int) -> float:
        images = [shape_sample(i)[0] for i in range(batch)]
        if shape.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = describe_batch(vlm, images, prefix, new_tokens, min_new_tokens=new_tokens)
        if shape.device == "cuda":
            torch.cuda.synchronize()
        assert all(n == new_tokens for _, n, _ in out), "every row generated the full length"
        return time.perf_counter() - t0

    run(1)  # warm-up
    rows = []
    for batch in sizes:
        seconds = min(run(batch) for _ in range(repeats))
        rows.append({"batch_size": batch, "seconds": round(seconds, 3),
                     "tokens_per_second": round(batch * new_tokens / seconds, 2)})
    base = rows[0]["tokens_per_second"] if rows[0]["batch_size"] == 1 else None
    for row in rows:
        row["speedup"] = round(row["tokens_per_second"] / base, 2) if base else None
    out = {"shape": name, "new_tokens": new_tokens, "image_tokens": (shape.image_size // shape.patch_size) ** 2,
           "auto_batch_size": auto, "levels": rows}
    if shape.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto",
                        help="auto: the CPU stand-in, and the 7B shape too when a GPU is present")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_results("generate", args.shape, lambda name: measure(name, args.batch_sizes, args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
