"""`text.source: generate`: the model describes every image (METHOD.md section 2).

Each image gets the chat-formatted `text.prompt` (`prompt_prefix`), and the model
continues greedily for at most `text.max_new_tokens`, `text.batch_size` images per
`model.generate` call (left padding, KV cache; `auto`: as many as fit the free GPU
memory). Special tokens are stripped from the decoded text.

Every finished batch is appended at once to `descriptions.jsonl` in the run directory (one
file per process under `accelerate launch`, each process describing its share), one
line per sample keyed by (sample_id, image pixel hash, generation key); the key hashes the
model (id, revision, resolved commit, dtype, built-in seed), the formatted prompt and
`max_new_tokens`. A killed run therefore loses at most the batch in flight, and a rerun
(or a later run with a changed corpus) regenerates only descriptions it does not have.

An empty generation (the model ends its turn at once) is kept as an empty description:
the sample still has its image positions, it just has no description tokens, so it can
never be text-activated. The text stage counts such samples (`empty` in the manifest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from builder.corpus.base import Sample, open_image
from builder.io import append_jsonl, read_jsonl, stable_hash
from builder.progress import progress
from builder.run import RunContext
from builder.text import SampleText, prompt_prefix

log = logging.getLogger("builder")

DESCRIPTIONS_FILE = "descriptions.jsonl"
"""Per-sample cache of generated descriptions, in the run directory."""


@dataclass(frozen=True)
class Description:
    """One generated description (a line of `descriptions.jsonl`)."""

    sample_id: str
    image_sha256: str
    """Pixel hash of the image it describes: a changed image is described again."""
    key: str
    """Hash of model, formatted prompt and max_new_tokens (`generation_key`)."""
    text: str
    """The decoded new tokens, special tokens removed, whitespace stripped."""
    new_tokens: int
    """Tokens generated before the end-of-turn token (or the limit)."""
    stopped: bool
    """True when the model ended its turn; False when `max_new_tokens` cut it."""


def generation_key(ctx: RunContext) -> str:
    """What a cached description depends on besides the image."""
    m = ctx.recipe.model
    vlm = ctx.vlm
    return stable_hash(
        {
            "model": m.id,
            "revision": m.revision,
            "resolved_revision": vlm.resolved_revision,
            "dtype": m.dtype,
            "seed": m.seed if m.id.startswith("builtin:") else None,
            "prefix": prompt_prefix(vlm.processor, ctx.recipe.text.prompt),
            "max_new_tokens": ctx.recipe.text.max_new_tokens,
        }
    )


def read_cache(path: Path, key: str) -> dict[tuple[str, str], Description]:
    """Cached descriptions made with `key`, by (sample_id, image_sha256); torn lines are ignored."""
    out = {}
    for row in read_jsonl(path):
        try:
            d = Description(**row)
        except TypeError:
            continue
        if d.key == key:
            out[(d.sample_id, d.image_sha256)] = d
    return out


def end_torn_line(path: Path) -> None:
    """A kill during an append can leave a last line without its newline: end it, so the
    next append starts a line of its own instead of gluing onto the torn one."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def describe_batch(vlm: Any, images: list[Image.Image], prefix: str, max_new_tokens: int,
                   min_new_tokens: int = 0) -> list[tuple[str, int, bool]]:
    """Greedy descriptions of a batch of images: (text, new tokens, ended its turn) per image.
    `min_new_tokens` holds off the end of turn (benchmarks: a fixed length on random weights)."""
    import torch

    processor, model = vlm.processor, vlm.model
    tokenizer = getattr(processor, "tokenizer", processor)
    # Left padding: every row's prompt ends at the last column, where generation continues.
    enc = processor(images=images, text=[prefix] * len(images), return_tensors="pt", padding=True, padding_side="left")
    enc = {k: v.to(vlm.device) for k, v in enc.items()}
    if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    with torch.inference_mode():
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, use_cache=True,
            pad_token_id=pad,
        )
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    results = []
    for row in new.tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        n = ends[0] if ends else len(row)
        text = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
        results.append((text, n, bool(ends)))
    return results


def generate_batch_size(vlm: Any, prefix: str, setting: int | str, max_new_tokens: int) -> int:
    """`setting`, or for `auto` what fits the free GPU memory (builder/capture/memory.py)."""
    from builder.capture.memory import choose_batch_size, generate_bytes_per_sample, shape_of
    from builder.models.layout import image_tokens_bound

    def per_sample() -> int:
        tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
        prompt = image_tokens_bound(vlm.model.config) + len(tokenizer(prefix)["input_ids"])
        return generate_bytes_per_sample(shape_of(vlm.model), prompt, max_new_tokens)

    return choose_batch_size(setting, vlm.device, per_sample).size


def cache_file(ctx: RunContext) -> Path:
    """This process's description file: `descriptions.jsonl`, or one per process of a
    multi-process launch (`descriptions-r-of-W.jsonl`), so that no two processes append to
    the same file."""
    procs = ctx.processes
    if procs.world == 1:
        return ctx.run_dir.path(DESCRIPTIONS_FILE)
    return ctx.run_dir.path(f"descriptions-{procs.rank}-of-{procs.world}.jsonl")


def read_all_caches(ctx: RunContext, key: str) -> dict[tuple[str, str], Description]:
    """Descriptions made with `key` in every description file of the run directory (those of
    earlier launches with another process count too)."""
    out: dict[tuple[str, str], Description] = {}
    for path in sorted(ctx.run_dir.root.glob("descriptions*.jsonl")):
        out.update(read_cache(path, key))
    return out


def generate_descriptions(ctx: RunContext, samples: list[Sample]) -> list[SampleText] | None:
    """The model's description of every sample, generating only those not cached yet.

    Under a multi-process launch process r describes samples r, r+W, ... into its own file;
    after a barrier the main process returns every description and the others None.
    """
    cfg = ctx.recipe.text
    vlm = ctx.vlm
    procs = ctx.processes
    key = generation_key(ctx)
    cache_path = cache_file(ctx)
    end_torn_line(cache_path)
    cache = read_all_caches(ctx, key)
    from builder.capture.stage import Shard

    # The share is fixed by position (capture's), not by what is cached: the files may
    # already be growing under the other processes while this one reads them.
    mine = [samples[i] for i in Shard(procs.rank, procs.world).indices(len(samples))]
    pending = [s for s in mine if (s.sample_id, s.image_sha256) not in cache]
    if len(pending) < len(mine):
        log.info("text: %d of %d descriptions cached", len(mine) - len(pending), len(mine))
    prefix = prompt_prefix(vlm.processor, cfg.prompt)
    batch_size = generate_batch_size(vlm, prefix, cfg.batch_size, cfg.max_new_tokens) if pending else 1
    with progress() as bar:
        task = bar.add_task(f"text[{procs.rank}/{procs.world}]: describing images", total=len(mine),
                            completed=len(mine) - len(pending))
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            images = [open_image(s.image_ref, ctx.recipe.corpus) for s in batch]
            made = [
                Description(s.sample_id, s.image_sha256, key, text, n, stopped)
                for s, (text, n, stopped) in zip(batch, describe_batch(vlm, images, prefix, cfg.max_new_tokens), strict=True)
            ]
            append_jsonl(cache_path, [d.__dict__ for d in made])  # on disk before the next batch starts
            cache.update({(d.sample_id, d.image_sha256): d for d in made})
            bar.advance(task, len(batch))
    if procs.world > 1:
        procs.barrier()  # every share is on disk
        if not procs.is_main:
            return None
        cache = read_all_caches(ctx, key)
    texts = [SampleText(s.sample_id, cache[(s.sample_id, s.image_sha256)].text, "generate") for s in samples]
    empty = sum(1 for t in texts if not t.text)
    if empty:
        log.warning("text: %d of %d generated descriptions are empty (kept: image tokens only)", empty, len(texts))
    return texts
