"""Corpus records, the reader interface, the reader registry and safe image decoding."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol, Union

import numpy as np
from PIL import Image, ImageFile

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


ImageData = Union[Image.Image, bytes, str, Path]
"""What a reader's `load_image` returns: a decoded image, encoded bytes, or a file path."""


@dataclass
class RawSample:
    """A sample as a reader yields it, before it is checked."""

    source_id: str
    """Stable id within the source (relative path, JSON id, dataset row)."""
    image_ref: str
    """How to reopen the image later (`open_image`): an absolute file path or `scheme:...`."""
    captions: list[str]
    """The caption(s); the stage picks `corpus.caption_index`."""
    load_image: Callable[[], ImageData]
    """Loads the image; may raise (missing file, truncated data, :class:`BadRecord`)."""
    source: str = ""
    """Where the sample came from, for skip records (file path or dataset row)."""
    persist: bool = False
    """The source cannot be reopened later (a stream): the stage stores the image's bytes
    under the run directory and the sample's `image_ref` points at that file."""
    image_file: str | None = None
    """The local file the image is read from, when it is one: `--dry-run` counts missing
    files without decoding anything."""


@dataclass(frozen=True)
class Sample:
    """A checked sample: one row of `samples.parquet`."""

    sample_id: str
    """Unique, stable id of the sample in the dataset."""
    source_id: str
    """Id of the sample in its source (relative path, JSON id, dataset row)."""
    image_ref: str
    """How `open_image` reopens the image (absolute path, `hf:<row>`, `builtin:<name>/<i>`)."""
    caption: str
    """The chosen caption ('' when captions are not needed: `text.source: generate`)."""
    image_sha256: str = ""
    """Hash of the decoded RGB pixels (used for deduplication and the description cache)."""
    converted_from: str = ""
    """Original image mode when it was converted to RGB (e.g. CMYK), else ''."""


@dataclass
class Skip:
    """One skipped sample: a line of `skipped.jsonl`."""

    source_id: str
    """Id of the sample in its source."""
    source: str
    """Where it came from (file path, JSON record, dataset row)."""
    reason: SkipReason
    """Why it was skipped."""
    detail: str = ""
    """The error message or other specifics."""

    def as_row(self) -> dict[str, str]:
        return {"id": self.source_id, "source": self.source, "reason": self.reason.value, "detail": self.detail}


class BadRecord(ValueError):
    """A source record is malformed (no image field, bad JSON line): skipped as `bad_record`."""


def bad_record(detail: str) -> Callable[[], ImageData]:
    """A `load_image` for a malformed record: raises :class:`BadRecord` when the stage checks it."""

    def fail() -> ImageData:
        raise BadRecord(detail)

    return fail


def caption_list(value: object) -> list[str]:
    """A caption cell (a string, a list of strings, None) as a list; positions are kept so
    that `corpus.caption_index` means the same caption for every sample."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [str(value)]
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (str, int, float)) for v in value):
        return ["" if v is None else str(v) for v in value]
    raise BadRecord(f"caption is a {type(value).__name__}, expected a string or a list of strings")


class MissingImage(FileNotFoundError):
    """A record names no image data at all (an empty image cell): skipped as `missing_image`."""


class ImageTooLarge(ValueError):
    """The image has more pixels than `corpus.max_image_pixels`: skipped as `image_too_large`."""


class CorpusReader(Protocol):
    """A source of image-caption samples.

    A reader may also define `ordered(seed: int | None) -> Iterator[RawSample]` (the
    samples, shuffled by `seed` when given) and `num_rows: int | None` when listing every
    sample up front would be too costly (large or streamed datasets); the stage then
    reads it lazily and stops at `corpus.limit`.
    """

    def __init__(self, cfg: CorpusConfig) -> None: ...

    def fingerprint(self) -> str:
        """Cheap hash of the source's content (files' names, sizes and mtimes; dataset fingerprint)."""
        ...

    def samples(self) -> Iterator[RawSample]:
        """Every sample of the source, in a stable order."""
        ...


READERS: dict[str, type[CorpusReader]] = {}
"""`corpus.kind` -> reader class."""

IMAGE_OPENERS: dict[str, Callable[[str, CorpusConfig], ImageData]] = {}
"""`image_ref` scheme (text before the first ':') -> function returning the image's data."""


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


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency is composited on white (dropping alpha would show whatever colour the
    transparent pixels happen to hold, often black); 16-bit and float images are scaled
    to 8 bits instead of clipped; CMYK with an embedded ICC profile goes through the
    profile, else Pillow's plain CMYK->RGB formula.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        image = _to_8bit_grey(image)
    elif mode == "CMYK" and image.info.get("icc_profile"):
        image = _cmyk_with_profile(image)
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    a = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        a = a / 257.0
    elif image.mode == "F" and a.size and np.nanmax(a) <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif a.size and np.nanmax(a) > 255:
        a = a * (255.0 / (65535.0 if np.nanmax(a) <= 65535 else float(np.nanmax(a))))
    return Image.fromarray(np.nan_to_num(np.clip(a, 0, 255)).round().astype(np.uint8), "L")


def _cmyk_with_profile(image: Image.Image) -> Image.Image:
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image  # a broken profile: fall back to the plain conversion


def decode_image(data: bytes | str | Path, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode fully (catches truncation), bound the size, convert to RGB.

    Returns the RGB image and the original mode when a conversion happened, else ''.
    The size is checked from the header before any pixel is decoded. Truncated files
    always fail here, even if another library set `ImageFile.LOAD_TRUNCATED_IMAGES`,
    and Pillow's advisory warnings (EXIF, palette transparency, size) are silenced:
    the caller records every failure as a skip.
    """
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(src) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLarge(f"{w}x{h} pixels > corpus.max_image_pixels={max_pixels}")
                if w == 0 or h == 0:
                    raise ValueError(f"empty image ({w}x{h})")
                im.load()
                mode = im.mode
                rgb = to_rgb(im)
                rgb = rgb.copy() if rgb is im else rgb
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{e} (Pillow's own bound, Image.MAX_IMAGE_PIXELS)") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    return rgb, ("" if mode == "RGB" else mode)


def load_rgb(data: ImageData, max_pixels: int) -> tuple[Image.Image, str]:
    """Whatever a reader returned, as an RGB image plus the original mode if it was converted."""
    if isinstance(data, Image.Image):
        w, h = data.size
        if w * h > max_pixels:
            raise ImageTooLarge(f"{w}x{h} pixels > corpus.max_image_pixels={max_pixels}")
        return to_rgb(data), ("" if data.mode == "RGB" else data.mode)
    return decode_image(data, max_pixels)


def pixels_hash(image: Image.Image) -> str:
    h = hashlib.sha256()
    h.update(f"{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def open_image(image_ref: str, cfg: CorpusConfig) -> Image.Image:
    """Reopen a checked sample's image as RGB from its `image_ref` (later stages)."""
    import builder.corpus.readers  # noqa: F401

    scheme = image_ref.split(":", 1)[0] if ":" in image_ref and not image_ref.startswith("/") else ""
    try:
        data = IMAGE_OPENERS[scheme](image_ref, cfg) if scheme in IMAGE_OPENERS else image_ref
        image, _ = load_rgb(data, cfg.max_image_pixels)
    except Exception as e:  # the corpus stage decoded this image: it changed or vanished since
        raise CorpusError(
            f"image {image_ref!r} cannot be reopened ({type(e).__name__}: {e}); it changed since the corpus "
            "stage: restore it or re-run with --force corpus"
        ) from e
    return image

