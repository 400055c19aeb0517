"""Corpus records, the reader interface and the reader registry."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from PIL import Image

from builder.config import CorpusConfig
from builder.errors import CorpusError


class SkipReason(str, Enum):
    """Why a sample was left out (written to `skipped.jsonl`)."""

    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"
    IMAGE_TOO_LARGE = "image_too_large"
    EMPTY_CAPTION = "empty_caption"
    DUPLICATE_IMAGE = "duplicate_image"
    BAD_RECORD = "bad_record"


@dataclass
class RawSample:
    """A sample as a reader yields it, before it is checked."""

    source_id: str
    """Stable id within the source (relative path, JSON id, dataset row)."""
    image_ref: str
    """How to reopen the image later (`open_image`): a file path or `scheme:...`."""
    captions: list[str]
    """The caption(s); the stage picks `corpus.caption_index`."""
    load_image: Callable[[], Image.Image]
    """Loads the image; may raise (missing file, truncated data)."""
    source: str = ""
    """Where the sample came from, for skip records (file path or dataset row)."""


@dataclass(frozen=True)
class Sample:
    """A checked sample: one row of `samples.parquet`."""

    sample_id: str
    """Unique, stable id of the sample in the dataset."""
    source_id: str
    image_ref: str
    caption: str
    image_sha256: str = ""
    """Hash of the decoded RGB pixels (used for deduplication)."""
    converted_from: str = ""
    """Original image mode when it was converted to RGB (e.g. CMYK), else ''."""


@dataclass
class Skip:
    """One skipped sample: a line of `skipped.jsonl`."""

    source_id: str
    source: str
    reason: SkipReason
    detail: str = ""

    def as_row(self) -> dict[str, str]:
        return {"id": self.source_id, "source": self.source, "reason": self.reason.value, "detail": self.detail}


class CorpusReader(Protocol):
    """A source of image-caption samples."""

    def __init__(self, cfg: CorpusConfig) -> None: ...

    def fingerprint(self) -> str:
        """Cheap hash of the source's content (files' names, sizes and mtimes; dataset fingerprint)."""
        ...

    def samples(self) -> Iterator[RawSample]:
        """Every sample of the source, in a stable order."""
        ...


READERS: dict[str, type[CorpusReader]] = {}
"""`corpus.kind` -> reader class."""

IMAGE_OPENERS: dict[str, Callable[[str, CorpusConfig], Image.Image]] = {}
"""`image_ref` scheme (text before the first ':') -> function that reopens the image."""


def register_reader(kind: str, opener_scheme: str | None = None, opener=None):
    def deco(cls):
        READERS[kind] = cls
        if opener_scheme and opener:
            IMAGE_OPENERS[opener_scheme] = opener
        return cls

    return deco


def reader_for(cfg: CorpusConfig) -> CorpusReader:
    import builder.corpus.readers  # noqa: F401  (registers the readers)

    if cfg.kind not in READERS:
        raise CorpusError(f"corpus.kind={cfg.kind!r}: no reader; available: {', '.join(sorted(READERS))}")
    return READERS[cfg.kind](cfg)


def decode_image(data: bytes | str, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode fully (catches truncation), bound the size, convert to RGB.

    Returns the RGB image and the original mode when a conversion happened, else ''.
    """
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageTooLarge(f"{w}x{h} pixels > corpus.max_image_pixels={max_pixels}")
        im.load()
        mode = im.mode
        rgb = im.convert("RGB") if mode != "RGB" else im.copy()
    return rgb, ("" if mode == "RGB" else mode)


class ImageTooLarge(ValueError):
    pass


def pixels_hash(image: Image.Image) -> str:
    h = hashlib.sha256()
    h.update(f"{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def open_image(image_ref: str, cfg: CorpusConfig) -> Image.Image:
    """Reopen a sample's image as RGB from its `image_ref`."""
    import builder.corpus.readers  # noqa: F401

    scheme = image_ref.split(":", 1)[0] if ":" in image_ref and not image_ref.startswith("/") else ""
    if scheme in IMAGE_OPENERS:
        image = IMAGE_OPENERS[scheme](image_ref, cfg)
    else:
        image, _ = decode_image(image_ref, cfg.max_image_pixels)
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class CorpusSummary:
    samples: list[Sample] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
