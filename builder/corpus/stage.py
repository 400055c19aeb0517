"""The corpus stage: samples.parquet + skipped.jsonl."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
from PIL import Image

from builder.config import CorpusConfig
from builder.corpus.base import (
    ImageTooLarge,
    RawSample,
    Sample,
    Skip,
    SkipReason,
    decode_image,
    pixels_hash,
    reader_for,
)
from builder.errors import CorpusError
from builder.io import write_parquet, write_text
from builder.progress import progress
from builder.run import RunContext

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


def check_sample(raw: RawSample, cfg: CorpusConfig, seen: dict[str, str]) -> Sample | Skip:
    """Decode and check one sample; a `Skip` says why it cannot be used."""
    idx = cfg.caption_index
    caption = raw.captions[idx].strip() if len(raw.captions) > idx and raw.captions[idx] else ""
    try:
        loaded = raw.load_image()
        if isinstance(loaded, Image.Image):
            image, converted = loaded.convert("RGB"), ("" if loaded.mode == "RGB" else loaded.mode)
        else:
            image, converted = decode_image(loaded, cfg.max_image_pixels)
    except FileNotFoundError as e:
        return Skip(raw.source_id, raw.source, SkipReason.MISSING_IMAGE, str(e))
    except ImageTooLarge as e:
        return Skip(raw.source_id, raw.source, SkipReason.IMAGE_TOO_LARGE, str(e))
    except (ValueError, KeyError, TypeError) as e:
        reason = SkipReason.BAD_RECORD if not raw.image_ref else SkipReason.UNREADABLE_IMAGE
        return Skip(raw.source_id, raw.source, reason, f"{type(e).__name__}: {e}")
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        return Skip(raw.source_id, raw.source, SkipReason.UNREADABLE_IMAGE, f"{type(e).__name__}: {e}")
    if not caption:
        return Skip(raw.source_id, raw.source, SkipReason.EMPTY_CAPTION, "no caption text")
    digest = pixels_hash(image)
    if cfg.dedup and digest in seen:
        return Skip(raw.source_id, raw.source, SkipReason.DUPLICATE_IMAGE, f"same pixels as {seen[digest]}")
    seen[digest] = raw.source_id
    return Sample(
        sample_id=raw.source_id,
        source_id=raw.source_id,
        image_ref=raw.image_ref,
        caption=caption,
        image_sha256=digest,
        converted_from=converted,
    )


def read_samples(path: Path) -> list[Sample]:
    import pyarrow.parquet as pq

    return [Sample(**row) for row in pq.read_table(path).to_pylist()]


class CorpusStage:
    name = "corpus"
    version = "1"
    sections = ("corpus",)

    def source_fingerprint(self, ctx: RunContext) -> str:
        fp = reader_for(ctx.recipe.corpus).fingerprint()
        ctx.manifest.corpus.update({"kind": ctx.recipe.corpus.kind, "path": ctx.recipe.corpus.path, "source_fingerprint": fp})
        return fp

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.samples, ctx.run_dir.skipped]

    def run(self, ctx: RunContext) -> dict[str, int]:
        cfg = ctx.recipe.corpus
        reader = reader_for(cfg)
        raws = list(reader.samples())
        if cfg.limit is not None and cfg.shuffle_seed is not None:
            random.Random(cfg.shuffle_seed).shuffle(raws)
        samples: list[Sample] = []
        skips: list[Skip] = []
        seen: dict[str, str] = {}
        used_ids: set[str] = set()
        with progress() as bar:
            task = bar.add_task("corpus: checking images", total=len(raws) if cfg.limit is None else cfg.limit)
            for raw in raws:
                if cfg.limit is not None and len(samples) >= cfg.limit:
                    break
                result = check_sample(raw, cfg, seen)
                if isinstance(result, Skip):
                    skips.append(result)
                    continue
                if result.sample_id in used_ids:
                    skips.append(Skip(raw.source_id, raw.source, SkipReason.BAD_RECORD, "duplicate source id"))
                    continue
                used_ids.add(result.sample_id)
                samples.append(result)
                bar.advance(task)
        if not samples:
            reasons = sorted({s.reason.value for s in skips}) or ["the source is empty"]
            raise CorpusError(
                f"corpus {cfg.kind}:{cfg.path} yielded no usable sample ({len(skips)} skipped: {', '.join(reasons)}); "
                "check corpus.path and the image files"
            )
        rows = [asdict(s) for s in samples]
        write_parquet(ctx.run_dir.samples, pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
        import json

        write_text(ctx.run_dir.skipped, "".join(json.dumps(s.as_row(), sort_keys=True) + "\n" for s in skips))
        from builder.io import file_digest

        ctx.manifest.corpus["fingerprint"] = file_digest(ctx.run_dir.samples)[:16]
        counts = {"samples": len(samples), "skipped": len(skips), "converted": sum(1 for s in samples if s.converted_from)}
        for reason in SkipReason:
            n = sum(1 for s in skips if s.reason == reason)
            if n:
                counts[f"skipped_{reason.value}"] = n
        return counts
