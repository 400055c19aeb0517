"""Bad and unusual images: every one is converted to RGB or skipped with a reason, never raised."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from builder.config import CorpusConfig
from builder.corpus.base import RawSample, SkipReason, decode_image, to_rgb
from builder.corpus.stage import check_sample

CFG = CorpusConfig(kind="folder", path=".")


def check(data, cfg: CorpusConfig = CFG, captions=("a caption",)):
    raw = RawSample("s", "ref", list(captions), lambda: data, "somewhere")
    return check_sample(raw, cfg, {})


def test_grey_and_one_bit_are_replicated_to_rgb(image_bytes):
    grey = Image.new("L", (4, 3), 77)
    sample = check(image_bytes(grey, "PNG"))
    assert sample.converted_from == "L"
    rgb, mode = decode_image(image_bytes(grey, "PNG"), 10**6)
    assert mode == "L" and rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (77, 77, 77)
    rgb, mode = decode_image(image_bytes(Image.new("1", (4, 4), 1), "PNG"), 10**6)
    assert mode == "1" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_transparency_is_composited_on_white(image_bytes):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (200, 0, 0, 128))
    rgb, mode = decode_image(image_bytes(rgba, "PNG"), 10**6)
    assert mode == "RGBA"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # fully transparent black -> white, not black
    r, g, b = rgb.getpixel((1, 0))
    assert abs(r - 227) <= 1 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # half red over white
    la = Image.new("LA", (1, 1), (0, 0))
    assert decode_image(image_bytes(la, "PNG"), 10**6)[0].getpixel((0, 0)) == (255, 255, 255)


def test_palette_images_with_and_without_transparency(image_bytes):
    pal = Image.new("RGB", (2, 2), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    rgb, mode = decode_image(image_bytes(pal, "PNG"), 10**6)
    assert mode == "P" and rgb.getpixel((0, 0)) == (10, 200, 30)
    gif = Image.new("P", (2, 1), 0)
    gif.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    gif.putpixel((1, 0), 1)
    gif.info["transparency"] = 0
    rgb, mode = decode_image(image_bytes(gif, "GIF"), 10**6)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (250, 0, 0)


def test_cmyk_jpeg_is_converted(image_bytes):
    cmyk = Image.new("RGB", (16, 16), (220, 30, 30)).convert("CMYK")
    sample = check(image_bytes(cmyk, "JPEG"))
    assert sample.converted_from == "CMYK"
    rgb, _ = decode_image(image_bytes(cmyk, "JPEG"), 10**6)
    r, g, b = rgb.getpixel((8, 8))
    assert r > 180 and g < 80 and b < 80  # still red


def test_sixteen_bit_and_float_images_are_scaled_not_clipped():
    grey16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    assert [to_rgb(grey16).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [to_rgb(floats).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_truncated_jpeg_is_skipped_even_if_truncated_loading_was_switched_on(image_bytes, shape, monkeypatch):
    data = image_bytes(shape(0), "JPEG")
    truncated = data[: len(data) // 2]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    skip = check(truncated)
    assert skip.reason == SkipReason.UNREADABLE_IMAGE and "truncated" in skip.detail
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


@pytest.mark.parametrize(
    "data, detail",
    [
        (b"", "UnidentifiedImageError"),
        (b"not an image at all", "UnidentifiedImageError"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, ""),  # a PNG signature and nothing valid after it
    ],
)
def test_garbage_is_unreadable(data, detail):
    skip = check(data)
    assert skip.reason == SkipReason.UNREADABLE_IMAGE and detail in skip.detail


def test_missing_file_and_directory(tmp_path):
    assert check(tmp_path / "nope.jpg").reason == SkipReason.MISSING_IMAGE
    skip = check(tmp_path)
    assert skip.reason == SkipReason.UNREADABLE_IMAGE and "IsADirectoryError" in skip.detail


def test_huge_images_are_refused_from_the_header(image_bytes, monkeypatch):
    big = image_bytes(Image.new("RGB", (200, 100)), "PNG")
    skip = check(big, CorpusConfig(kind="folder", path=".", max_image_pixels=19_999))
    assert skip.reason == SkipReason.IMAGE_TOO_LARGE and skip.detail == "200x100 pixels > corpus.max_image_pixels=19999"
    assert check(big, CorpusConfig(kind="folder", path=".", max_image_pixels=20_000)).converted_from == ""
    # Pillow's own bomb guard (2x Image.MAX_IMAGE_PIXELS) is also a size skip, and its
    # warning below that never escapes, even when warnings are errors.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check(image_bytes(Image.new("RGB", (40, 40)), "PNG")).converted_from == ""  # 1600 px: warning zone
        skip = check(image_bytes(Image.new("RGB", (50, 50)), "PNG"))  # 2500 px > 2 x 1000: bomb error
    assert skip.reason == SkipReason.IMAGE_TOO_LARGE and "MAX_IMAGE_PIXELS" in skip.detail


def test_empty_or_absent_caption_and_caption_index():
    img = Image.new("RGB", (2, 2))
    assert check(img, captions=["  "]).reason == SkipReason.EMPTY_CAPTION
    assert check(img, captions=[]).detail == "no caption"
    cfg = CorpusConfig(kind="folder", path=".", caption_index=1)
    assert check(img, cfg, captions=["a", " b "]).caption == "b"
    assert check(img, cfg, captions=["a"]).detail == "no caption 1 (has 1)"
