"""The corpus stage: samples.parquet + skipped.jsonl.

Every image is decoded once here (bounded by `corpus.max_image_pixels`), converted to RGB
and hashed; a sample that cannot be used is skipped, never raised: each skip is a line of
`skipped.jsonl` (id, source, reason, detail) and a count in the manifest.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
from PIL import Image

from builder.config import CorpusConfig, Recipe
from builder.corpus.base import (
    BadRecord,
    CorpusReader,
    ImageTooLarge,
    RawSample,
    Sample,
    Skip,
    SkipReason,
    load_rgb,
    pixels_hash,
    reader_for,
)
from builder.errors import CorpusError
from builder.io import file_digest, stable_hash, write_bytes, write_parquet, write_text
from builder.progress import progress
from builder.run import RunContext

log = logging.getLogger("builder")

SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source_id", pa.string()),
        ("image_ref", pa.string()),
        ("caption", pa.string()),
        ("image_sha256", pa.string()),
        ("converted_from", pa.string()),
    ]
)
IMAGES_DIR = "corpus-images"
"""Run-directory folder of the images of sources that cannot be reopened (streams)."""


def captions_required(recipe: Recipe) -> bool:
    """A caption is needed only when it is the description (`text.source: caption`);
    with `generate` an image without a caption is a usable sample."""
    return recipe.text.source == "caption"


def check_sample(raw: RawSample, cfg: CorpusConfig, seen: dict[str, str], need_caption: bool = True) -> Sample | Skip:
    """Decode and check one sample; a `Skip` says why it cannot be used.

    Never raises for bad data: every error of reading or decoding the image becomes a skip.
    """

    def skip(reason: SkipReason, detail: str) -> Skip:
        return Skip(raw.source_id, raw.source, reason, detail)

    idx = cfg.caption_index
    caption = raw.captions[idx].strip() if len(raw.captions) > idx else ""
    try:
        image, converted = load_rgb(raw.load_image(), cfg.max_image_pixels)
    except BadRecord as e:
        return skip(SkipReason.BAD_RECORD, str(e))
    except (FileNotFoundError, NotADirectoryError) as e:
        return skip(SkipReason.MISSING_IMAGE, f"{type(e).__name__}: {e}")
    except ImageTooLarge as e:
        return skip(SkipReason.IMAGE_TOO_LARGE, str(e))
    except Exception as e:  # any decoder failure (OSError, SyntaxError, struct.error, ...) is this sample's
        return skip(SkipReason.UNREADABLE_IMAGE, f"{type(e).__name__}: {e}")
    if need_caption and not caption:
        n = len(raw.captions)
        detail = "no caption" if n == 0 else f"caption {idx} of {n} is empty" if idx < n else f"no caption {idx} (has {n})"
        return skip(SkipReason.EMPTY_CAPTION, detail)
    digest = pixels_hash(image)
    if cfg.dedup and digest in seen:
        return skip(SkipReason.DUPLICATE_IMAGE, f"same pixels as {seen[digest]}")
    seen[digest] = raw.source_id
    return Sample(
        sample_id=raw.source_id,
        source_id=raw.source_id,
        image_ref=raw.image_ref,
        caption=caption,
        image_sha256=digest,
        converted_from=converted,
    )


def ordered_samples(reader: CorpusReader, cfg: CorpusConfig) -> tuple[Iterable[RawSample], int | None]:
    """The samples in the order they are checked, and how many there are (None: unknown).

    With `limit` and `shuffle_seed` the order is a seeded shuffle, so the first `limit`
    usable samples are a seeded random subset. Readers with `ordered()` (large or streamed
    datasets) are read lazily, so the stage stops reading once `limit` samples are usable.
    """
    seed = cfg.shuffle_seed if cfg.limit is not None else None
    lazy = getattr(reader, "ordered", None)
    if lazy is not None:
        return lazy(seed), getattr(reader, "num_rows", None)
    raws = list(reader.samples())
    if seed is not None:
        random.Random(seed).shuffle(raws)
    return raws, len(raws)


def persist_image(raw: RawSample, folder: Path, digest: str) -> Path:
    """Store a streamed sample's original image bytes (a decoded image: lossless PNG)."""
    data = raw.load_image()
    if isinstance(data, Image.Image):
        buf = io.BytesIO()
        data.save(buf, format="PNG")
        data = buf.getvalue()
    elif not isinstance(data, bytes):
        data = Path(data).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        ext = (im.format or "img").lower()
    path = folder / f"{digest}.{ext}"
    if not path.exists():
        write_bytes(path, data)
    return path.resolve()


def read_samples(path: Path) -> list[Sample]:
    import pyarrow.parquet as pq

    return [Sample(**row) for row in pq.read_table(path).to_pylist()]


class CorpusStage:
    name = "corpus"
    version = "2"
    sections = ("corpus",)

    def source_fingerprint(self, ctx: RunContext) -> str:
        fp = reader_for(ctx.recipe.corpus).fingerprint()
        ctx.manifest.corpus.update({"kind": ctx.recipe.corpus.kind, "path": ctx.recipe.corpus.path, "source_fingerprint": fp})
        # Whether captions are required comes from the text section: it changes what is skipped.
        return stable_hash([fp, captions_required(ctx.recipe)])

    def outputs(self, ctx: RunContext) -> list[Path]:
        persisted = bool(getattr(reader_for(ctx.recipe.corpus), "persists_images", False))
        return [ctx.run_dir.samples, ctx.run_dir.skipped] + ([ctx.run_dir.path(IMAGES_DIR)] if persisted else [])

    def run(self, ctx: RunContext) -> dict[str, int]:
        cfg = ctx.recipe.corpus
        need_caption = captions_required(ctx.recipe)
        reader = reader_for(cfg)
        raws, total = ordered_samples(reader, cfg)
        if cfg.limit is not None:
            total = cfg.limit if total is None else min(total, cfg.limit)
        images_dir = ctx.run_dir.path(IMAGES_DIR)
        samples: list[Sample] = []
        skips: list[Skip] = []
        seen: dict[str, str] = {}
        used_ids: set[str] = set()
        with progress() as bar:
            task = bar.add_task("corpus: checking images", total=total)
            for raw in raws:
                if cfg.limit is not None and len(samples) >= cfg.limit:
                    break
                if raw.source_id in used_ids:
                    skips.append(Skip(raw.source_id, raw.source, SkipReason.BAD_RECORD, "duplicate source id"))
                    continue
                result = check_sample(raw, cfg, seen, need_caption)
                if isinstance(result, Skip):
                    skips.append(result)
                    continue
                if raw.persist:
                    result = replace(result, image_ref=str(persist_image(raw, images_dir, result.image_sha256)))
                used_ids.add(result.sample_id)
                samples.append(result)
                bar.advance(task)
        write_text(ctx.run_dir.skipped, "".join(json.dumps(s.as_row(), sort_keys=True) + "\n" for s in skips))
        if not samples:
            reasons = sorted({s.reason.value for s in skips}) or ["the source is empty"]
            raise CorpusError(
                f"corpus {cfg.kind}:{cfg.path} yielded no usable sample ({len(skips)} skipped: {', '.join(reasons)}; "
                f"see {ctx.run_dir.skipped}); check corpus.path and the image files"
            )
        write_parquet(ctx.run_dir.samples, pa.Table.from_pylist([asdict(s) for s in samples], schema=SAMPLES_SCHEMA))
        if images_dir.is_dir():  # drop images of an earlier run that this one no longer uses
            keep = {Path(s.image_ref).name for s in samples}
            for f in images_dir.iterdir():
                if f.name not in keep and not f.name.startswith("."):
                    f.unlink()
        ctx.manifest.corpus["fingerprint"] = file_digest(ctx.run_dir.samples)[:16]
        counts = {"samples": len(samples), "skipped": len(skips), "converted": sum(1 for s in samples if s.converted_from)}
        for reason in SkipReason:
            n = sum(1 for s in skips if s.reason == reason)
            if n:
                counts[f"skipped_{reason.value}"] = n
        for s in skips:
            log.debug("corpus: skipped %s (%s): %s", s.source_id, s.reason.value, s.detail)
        if skips:
            log.info("corpus: %d of %d samples skipped, see %s", len(skips), len(skips) + len(samples), ctx.run_dir.skipped)
        return counts
