"""A whole build on a folder corpus with bad input: it completes and every skip is recorded."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from builder.config import load_recipe
from builder.pipeline import default_stages
from builder.run import Executor


@pytest.fixture
def bad_corpus(tmp_path, write_folder, shape, image_bytes):
    """Eight good images plus a truncated JPEG, a missing file, an empty caption, a CMYK JPEG and a duplicate."""
    files = {f"good/{i}.png": image_bytes(shape(i), "PNG") for i in range(8)}
    jpeg = image_bytes(shape(20), "JPEG")
    files["bad/truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["bad/no-caption.png"] = image_bytes(shape(21), "PNG")
    files["odd/cmyk.jpg"] = image_bytes(shape(22).convert("CMYK"), "JPEG")
    files["odd/copy-of-3.png"] = image_bytes(shape(3), "PNG")
    lines = [{"image": f"good/{i}.png", "caption": f"a picture number {i}"} for i in range(8)]
    lines += [
        {"image": "bad/truncated.jpg", "caption": "cut short"},
        {"image": "bad/missing.jpg", "caption": "not there"},
        {"image": "bad/no-caption.png", "caption": "   "},
        {"image": "odd/cmyk.jpg", "caption": "printed colours"},
        {"image": "odd/copy-of-3.png", "caption": "the same pixels again"},
    ]
    return write_folder(tmp_path / "corpus", lines, files)


def test_bad_input_never_stops_the_build(tmp_path, bad_corpus):
    recipe = load_recipe("tiny", ["corpus.kind=folder", f"corpus.path={bad_corpus}"])
    ex = Executor(recipe, tmp_path / "run", default_stages())
    outcomes = ex.run()
    assert all(o.ran for o in outcomes)

    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in skipped}
    assert {k: r["reason"] for k, r in by_id.items()} == {
        "bad/truncated.jpg": "unreadable_image",
        "bad/missing.jpg": "missing_image",
        "bad/no-caption.png": "empty_caption",
        "odd/copy-of-3.png": "duplicate_image",
    }
    assert "truncated" in by_id["bad/truncated.jpg"]["detail"]
    assert by_id["bad/missing.jpg"]["source"] == str((bad_corpus / "bad" / "missing.jpg").resolve())
    assert by_id["odd/copy-of-3.png"]["detail"] == "same pixels as good/3.png"

    counts = ex.manifest.stages["corpus"].counts
    assert counts == {
        "samples": 9, "skipped": 4, "converted": 1, "skipped_missing_image": 1, "skipped_unreadable_image": 1,
        "skipped_empty_caption": 1, "skipped_duplicate_image": 1,
    }
    samples = pq.read_table(tmp_path / "run" / "samples.parquet").to_pylist()
    cmyk = next(s for s in samples if s["sample_id"] == "odd/cmyk.jpg")
    assert cmyk["converted_from"] == "CMYK"
    # The CMYK image went through capture and is in the published samples config.
    published = pq.read_table(tmp_path / "run" / "dataset" / "samples").to_pylist()
    assert {s["sample_id"] for s in published} == {s["sample_id"] for s in samples}
    assert next(s for s in published if s["sample_id"] == "odd/cmyk.jpg")["text"] == "printed colours"
    assert ex.manifest.stages["capture"].counts["visual_positions"] == 9 * 36
    card = (tmp_path / "run" / "dataset" / "README.md").read_text()
    assert "**9** used, **4** skipped" in card
    for reason in ("missing_image", "unreadable_image", "empty_caption", "duplicate_image"):
        assert f"`{reason}`: 1" in card
