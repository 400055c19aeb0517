"""Packaging and validating a dataset of LLaVA-1.5-7B's size, from a synthetic run directory.

The run directory holds what the upstream stages write for the real recipe: 32 x 11,008
neurons with N = 50 top samples each, 23,000 samples, and 960 explained neurons (10 per
layer and category) with 10 exemplars each (336 x 336 JPEG images, 24 x 24 heatmaps, ~100
tokens), their explanations and scores. Prints JSON: seconds to package and to validate,
the peak memory of packaging plus validation, and the layout (shards, row groups, bytes) of
each config.

    python benchmarks/package.py [--layers 32] [--width 11008] [--samples 23000]
                                 [--explained-per-layer 30] [--exemplars 10] [--image-size 336]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def neurons_table(layers: int, width: int, top_n: int, samples: int, rng: np.random.Generator) -> pa.Table:
    """Consistent neurons: fractions are counts out of N, the category is their argmax."""
    from builder.classify import CATEGORIES

    n = layers * width
    weights = rng.dirichlet([0.6, 0.6, 1.2, 0.4], size=n)
    counts = np.stack([rng.multinomial(top_n, w) for w in weights[: min(n, 20_000)]])
    counts = counts[rng.integers(0, len(counts), n)]  # reuse 20k draws: multinomial per row is slow
    fractions = (counts / top_n).astype(np.float32)
    category = fractions.argmax(axis=1)  # first maximum = the default tie-break order
    confidence = fractions[np.arange(n), category]
    ids = np.asarray([f"coco-{i:06d}" for i in range(samples)], dtype=object)
    top = rng.integers(0, samples, size=(n, top_n))
    return pa.table({
        "layer": np.repeat(np.arange(layers, dtype=np.int32), width),
        "neuron": np.tile(np.arange(width, dtype=np.int32), layers),
        "category": pa.array(np.asarray(CATEGORIES, dtype=object)[category].tolist(), pa.string()),
        "p_visual": fractions[:, 0], "p_text": fractions[:, 1], "p_multimodal": fractions[:, 2], "p_unknown": fractions[:, 3],
        "confidence": confidence,
        "high_confidence": confidence > 0.8,
        "max_activation": rng.gamma(2.0, 1.0, n).astype(np.float32),
        "mean_visual": rng.normal(0, 0.1, n).astype(np.float32),
        "mean_text": rng.normal(0, 0.1, n).astype(np.float32),
        "n_top": np.full(n, top_n, dtype=np.int32),
        "dead": np.zeros(n, dtype=bool),
        "top_sample_ids": pa.array(ids[top].tolist(), pa.list_(pa.string())),
    })


def jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A photo-like JPEG: smooth colour gradients plus noise (~JPEG q90 sizes of real exemplars)."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(x * rng.uniform(1, 6) + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
    pixels = (127 + 100 * base + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_run_in_child(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Make the inputs in a child process, so the peak memory reported is packaging's own."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(write_run(root, args)))
    child.start()
    made = queue.get()
    child.join()
    return made


def write_run(root: Path, args: argparse.Namespace) -> dict[str, float]:
    from builder.classify import layer_table
    from builder.config import load_recipe
    from builder.corpus.stage import SAMPLES_SCHEMA
    from builder.run import Manifest, StageRecord
    from builder.simulate.stage import SCORES_FILE, SCORES_SCHEMA

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    ids = [f"coco-{i:06d}" for i in range(args.samples)]
    words = np.asarray("a the man dog red train on with of table near street sky".split(), dtype=object)
    texts = [" ".join(rng.choice(words, 100)) for _ in ids]
    pq.write_table(pa.Table.from_pylist([
        {"sample_id": s, "source_id": s, "image_ref": f"{s}.jpg", "caption": "", "image_sha256": "", "converted_from": ""}
        for s in ids], schema=SAMPLES_SCHEMA), root / "samples.parquet")
    pq.write_table(pa.table({"sample_id": ids, "text": texts, "text_source": ["generate"] * len(ids)}),
                   root / "texts.parquet")
    neurons = neurons_table(args.layers, args.width, 50, args.samples, rng)
    pq.write_table(neurons, root / "neurons.parquet")
    pq.write_table(layer_table(neurons), root / "layers.parquet")

    # explained neurons: the first `explained_per_layer` live neurons of each layer
    picked = [(l, n) for l in range(args.layers) for n in range(args.explained_per_layer)]
    top = neurons.column("top_sample_ids")
    category = neurons.column("category").to_pylist()
    rows, explanations, scores = [], [], []
    for l, n in picked:
        i = l * args.width + n
        for rank in range(args.exemplars):
            rows.append({
                "layer": l, "neuron": n, "rank": rank, "sample_id": top[i][rank].as_py(),
                "role": "shown" if rank < args.exemplars // 2 else "held_out",
                "image": {"bytes": jpeg(rng, args.image_size), "path": f"L{l}-N{n}-r{rank}.jpg"},
                "heatmap": rng.uniform(0, 10, (24, 24)).astype(np.float32).tolist(),
                "tokens": texts[0].split(),
                "token_activations": rng.uniform(0, 10, 100).astype(np.float32).tolist(),
            })
        explanations.append({
            "layer": l, "neuron": n, "category": category[i], "explanation": "the presence of a train",
            "explainer": "openai:gpt-4o", "prompt_version": "v1", "status": "ok", "failure": None,
        })
        score = float(rng.uniform(-0.2, 0.9))
        scores.append({
            "layer": l, "neuron": n, "category": category[i], "simulator": "grounded", "score": score,
            "visual_score": score, "baseline_score": float(rng.uniform(-0.2, 0.2)), "status": "ok",
            "per_sample_scores": [{"sample_id": top[i][r].as_py(), "modality": "visual", "role": "held_out",
                                   "score": float(rng.uniform(-1, 1))} for r in range(args.exemplars // 2, args.exemplars)],
        })
    pq.write_table(pa.Table.from_pylist(rows), root / "exemplars.parquet")
    pq.write_table(pa.Table.from_pylist(explanations), root / "explanations.parquet")
    pq.write_table(pa.Table.from_pylist(scores, schema=SCORES_SCHEMA), root / SCORES_FILE)

    recipe = load_recipe("llava15-7b")
    manifest = Manifest(
        recipe=recipe.model_dump(mode="json"),
        package={"version": "bench", "git_commit": ""},
        model={"layers": args.layers, "neurons_per_layer": args.width, "image_grid": [24, 24], "resolved_revision": ""},
        corpus={"fingerprint": "bench"},
        stages={
            "corpus": StageRecord(status="done", counts={"samples": args.samples, "skipped": 0}),
            "classify": StageRecord(status="done", counts={"neurons": neurons.num_rows}),
            "exemplars": StageRecord(status="done", counts={"exemplars": len(rows)}),
            "explain": StageRecord(status="done", counts={"neurons": len(explanations)}),
        },
    )
    manifest.save(root / "manifest.json")
    return {"make_inputs_s": round(time.perf_counter() - t0, 2), "exemplar_rows": len(rows)}


def layout(dataset: Path) -> dict[str, dict[str, float]]:
    out = {}
    for folder in sorted(p for p in dataset.iterdir() if p.is_dir() and any(p.glob("*.parquet"))):
        files = sorted(folder.glob("*.parquet"))
        metas = [pq.ParquetFile(f).metadata for f in files]
        groups = [m.row_group(i) for m in metas for i in range(m.num_row_groups)]
        out[folder.name] = {
            "rows": sum(m.num_rows for m in metas),
            "shards": len(files),
            "largest_shard_mb": round(max(f.stat().st_size for f in files) / 1e6, 1),
            "total_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
            "row_groups": len(groups),
            "max_rows_per_group": max(g.num_rows for g in groups),
            "max_group_uncompressed_mb": round(max(g.total_byte_size for g in groups) / 1e6, 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=11008)
    parser.add_argument("--samples", type=int, default=23000)
    parser.add_argument("--explained-per-layer", type=int, default=30, help="10 per category x 3 categories")
    parser.add_argument("--exemplars", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=336)
    args = parser.parse_args()

    import os

    os.environ.setdefault("BUILDER_PROGRESS", "0")
    from builder.config import recipe_from_dict
    from builder.package import PackageStage
    from builder.run import Manifest, RunContext, RunDir
    from validation import validate_dataset

    import builder.plots  # noqa: F401  (imported before timing, as in a build where earlier stages loaded them)
    import matplotlib.figure  # noqa: F401

    root = Path(tempfile.mkdtemp(prefix="bench-package-"))
    try:
        made = write_run_in_child(root, args)
        manifest = Manifest.load(root / "manifest.json")
        ctx = RunContext(recipe_from_dict(manifest.recipe), RunDir(root), manifest)
        t0 = time.perf_counter()
        counts = PackageStage().run(ctx)
        package_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = validate_dataset(root / "dataset")
        validate_s = time.perf_counter() - t0
        print(json.dumps({
            "benchmark": "package+validate",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyarrow": pa.__version__},
            "inputs": {"neurons": args.layers * args.width, "samples": args.samples, **made},
            "package_s": round(package_s, 2),
            "validate_s": round(validate_s, 2),
            "validation_ok": report.ok,
            "failed_checks": [c.name for c in report.failures],
            "checks": len(report.checks),
            "peak_rss_mb_package_and_validate": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "counts": counts,
            "layout": layout(root / "dataset"),
        }, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
