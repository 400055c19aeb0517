"""Corpus checking and description generation throughput. Prints JSON.

- corpus stage on COCO-sized JPEGs (640x480): a `folder` corpus, the same images as an
  `hf` save_to_disk dataset (map-style), and streamed from parquet (images stored under
  the run directory); images/s of the whole stage (decode, RGB, pixel hash, dedup, write);
- reopening one image later (`open_image`): file path vs `hf:<row>`;
- `text.source: generate` with the built-in tiny LLaVA on this machine: descriptions/s at
  text.batch_size 1 and 8 (batching with the KV cache), and a rerun served from the cache.

    python benchmarks/corpus.py [--images 400] [--describe 32] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BUILDER_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def coco_like_jpegs(folder: Path, n: int) -> list[str]:
    """n distinct 640x480 JPEGs with shapes and noise (about COCO's bytes per image)."""
    import numpy as np
    from PIL import Image

    from builder.corpus.shapes import shape_sample

    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        base = np.asarray(shape_sample(i)[0].resize((640, 480)), dtype=np.int16)
        noisy = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
        name = f"{i:06d}.jpg"
        Image.fromarray(noisy).save(folder / name, quality=90)
        names.append(name)
    return names


def corpus_rate(recipe_corpus: dict, text_source: str, out: Path) -> dict:
    from builder.config import recipe_from_dict
    from builder.corpus.stage import CorpusStage
    from builder.run import Executor

    recipe = recipe_from_dict({"corpus": recipe_corpus, "text": {"source": text_source}})
    t0 = time.perf_counter()
    ex = Executor(recipe, out, [CorpusStage()])
    ex.run()
    seconds = time.perf_counter() - t0
    n = ex.manifest.stages["corpus"].counts["samples"]
    return {"samples": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)}


def reopen_ms(refs: list[str], cfg) -> float:
    from builder.corpus.base import open_image

    open_image(refs[0], cfg)  # the hf opener loads the dataset once per process
    t0 = time.perf_counter()
    for ref in refs:
        open_image(ref, cfg)
    return round(1000 * (time.perf_counter() - t0) / len(refs), 2)


def generation_rate(work: Path, n: int, batch_size: int, max_new_tokens: int) -> dict:
    from builder.config import load_recipe
    from builder.pipeline import default_stages
    from builder.run import Executor

    overrides = ["text.source=generate", f"text.batch_size={batch_size}", f"text.max_new_tokens={max_new_tokens}",
                 f"corpus.size={n}"]
    ex = Executor(load_recipe("tiny", overrides), work, default_stages())
    ex.run(until="corpus")
    _ = ex.ctx.vlm  # load the model outside the timing
    t0 = time.perf_counter()
    ex.run(until="text")
    first = time.perf_counter() - t0
    ex2 = Executor(load_recipe("tiny", overrides), work, default_stages())
    _ = ex2.ctx.vlm
    t0 = time.perf_counter()
    ex2.run(until="text", force=["text"])
    cached = time.perf_counter() - t0
    return {"batch_size": batch_size, "descriptions": n, "seconds": round(first, 2),
            "descriptions_per_s": round(n / first, 1), "rerun_from_cache_seconds": round(cached, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--describe", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    from builder.quiet import quiet_libraries

    quiet_libraries()
    import datasets
    import torch
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from builder.config import CorpusConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("BUILDER_CACHE", str(tmp / "model-cache"))
        datasets.config.HF_DATASETS_CACHE = str(tmp / "hf-cache")
        images = tmp / "images"
        images.mkdir()
        names = coco_like_jpegs(images, args.images)
        mean_kb = sum((images / n).stat().st_size for n in names) / len(names) / 1024
        (images / "captions.jsonl").write_text("".join(json.dumps({"image": n, "caption": f"image {n}"}) + "\n" for n in names))
        ds = Dataset.from_dict(
            {"image": [str(images / n) for n in names], "caption": [f"image {n}" for n in names]},
            features=Features({"image": ImageFeature(), "caption": Value("string")}),
        )
        ds.save_to_disk(str(tmp / "ds"))
        ds.to_parquet(str(tmp / "train.parquet"))

        result = {
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
            "images": {"count": args.images, "size": "640x480 JPEG", "mean_kb": round(mean_kb, 1)},
            "corpus_stage": {
                "folder": corpus_rate({"kind": "folder", "path": str(images)}, "caption", tmp / "r-folder"),
                "hf_map_style": corpus_rate({"kind": "hf", "path": str(tmp / "ds")}, "caption", tmp / "r-hf"),
                "hf_streaming": corpus_rate({"kind": "hf", "path": str(tmp / "train.parquet"), "streaming": True},
                                            "caption", tmp / "r-stream"),
            },
        }
        sample = random.Random(0).sample(range(args.images), min(100, args.images))
        result["reopen_ms_per_image"] = {
            "file_path": reopen_ms([str(images / names[i]) for i in sample], CorpusConfig(kind="folder", path=str(images))),
            "hf_row": reopen_ms([f"hf:{i}" for i in sample], CorpusConfig(kind="hf", path=str(tmp / "ds"))),
        }
        result["generate_tiny_llava"] = {
            "max_new_tokens": args.max_new_tokens,
            "runs": [generation_rate(tmp / f"gen-{b}", args.describe, b, args.max_new_tokens) for b in (1, 8)],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
