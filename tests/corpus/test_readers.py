"""Each reader on small local data made here: hf (save_to_disk, parquet, a dataset folder,
streaming), llava-json with an image root, folder; limit, seeded subset and dedup."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from builder.config import CorpusConfig
from builder.corpus.base import open_image, reader_for
from builder.errors import CorpusError

# Rows of the hf test dataset: image index (None: no image), captions, id.
# Row 3 repeats row 0's image, row 4 has no image, row 5 an empty caption list.
HF_ROWS = [(0, ["a red thing", "first alt"]), (1, ["b", "second alt"]), (2, ["c", "third alt"]),
           (0, ["duplicate", "x"]), (None, ["no image", "y"]), (5, [])] + [(i, [f"cap {i}", f"alt {i}"]) for i in range(6, 12)]


@pytest.fixture
def hf_dataset(shape):
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "captions": List(Value("string")), "uid": Value("string")})
    return Dataset.from_dict(
        {
            "image": [None if i is None else shape(i) for i, _ in HF_ROWS],
            "captions": [c for _, c in HF_ROWS],
            "uid": [f"img-{r:02d}" for r in range(len(HF_ROWS))],
        },
        features=features,
    )


def hf_corpus(path: Path | str, **extra) -> dict:
    return {"kind": "hf", "path": str(path), "caption_column": "captions", "id_column": "uid", **extra}


def assert_hf_result(samples, skips, caption_index: int = 0) -> None:
    assert [s.sample_id for s in samples] == ["img-00", "img-01", "img-02"] + [f"img-{r:02d}" for r in range(6, 12)]
    assert samples[1].caption == HF_ROWS[1][1][caption_index]
    assert {(r["id"], r["reason"]) for r in skips} == {
        ("img-03", "duplicate_image"),
        ("img-04", "missing_image"),
        ("img-05", "empty_caption"),
    }
    assert all("[train] row" in r["source"] for r in skips)


def test_hf_save_to_disk_list_captions_reopened_by_row(tmp_path, hf_dataset, run_corpus, shape):
    hf_dataset.save_to_disk(str(tmp_path / "ds"))
    samples, skips, counts, _ = run_corpus(**hf_corpus(tmp_path / "ds", caption_index=1))
    assert_hf_result(samples, skips, caption_index=1)
    assert counts["samples"] == 9 and counts["skipped"] == 3
    # map-style: nothing copied, the image is reopened by row index
    assert samples[2].image_ref == "hf:2"
    cfg = CorpusConfig(**hf_corpus(tmp_path / "ds", caption_index=1))
    assert open_image(samples[2].image_ref, cfg).tobytes() == shape(2).tobytes()


def test_hf_parquet_file_and_dataset_folder(tmp_path, hf_dataset, run_corpus, shape):
    hf_dataset.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    samples, skips, _, _ = run_corpus(out="a", **hf_corpus(tmp_path / "pq" / "train.parquet"))
    assert_hf_result(samples, skips)
    cfg = CorpusConfig(**hf_corpus(tmp_path / "pq" / "train.parquet"))
    assert open_image("hf:7", cfg).tobytes() == shape(7).tobytes()
    # A folder laid out like a Hub repo (data/train-*.parquet) goes through load_dataset(folder).
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train-00000-of-00001.parquet").write_bytes((tmp_path / "pq" / "train.parquet").read_bytes())
    samples2, skips2, _, _ = run_corpus(out="b", **hf_corpus(repo))
    assert [s.sample_id for s in samples2] == [s.sample_id for s in samples]
    assert [(r["id"], r["reason"]) for r in skips2] == [(r["id"], r["reason"]) for r in skips]


def test_hf_streaming_stores_only_used_images(tmp_path, hf_dataset, run_corpus, shape):
    hf_dataset.to_parquet(str(tmp_path / "train.parquet"))
    samples, skips, counts, rd = run_corpus(**hf_corpus(tmp_path / "train.parquet", streaming=True, limit=4))
    assert [s.sample_id for s in samples] == ["img-00", "img-01", "img-02", "img-06"]
    assert [(r["id"], r["reason"]) for r in skips] == [
        ("img-03", "duplicate_image"), ("img-04", "missing_image"), ("img-05", "empty_caption")]
    stored = sorted((rd.root / "corpus-images").iterdir())
    assert len(stored) == 4 and all(p.suffix == ".png" for p in stored)
    cfg = CorpusConfig(**hf_corpus(tmp_path / "train.parquet", streaming=True))
    for s in samples:
        assert Path(s.image_ref).parent == (rd.root / "corpus-images").resolve()
        i = int(s.sample_id.split("-")[1])
        assert open_image(s.image_ref, cfg).tobytes() == shape(i).tobytes()


def test_hf_streaming_seeded_subset_is_reproducible(tmp_path, hf_dataset, run_corpus):
    hf_dataset.save_to_disk(str(tmp_path / "ds"))
    corpus = hf_corpus(tmp_path / "ds", streaming=True, limit=3, shuffle_seed=7, shuffle_buffer=100)
    first, _, _, _ = run_corpus(out="a", **corpus)
    again, _, _, _ = run_corpus(out="b", **corpus)
    other, _, _, _ = run_corpus(out="c", **{**corpus, "shuffle_seed": 8})
    assert [s.sample_id for s in first] == [s.sample_id for s in again]
    assert len(first) == 3 and [s.sample_id for s in first] != [s.sample_id for s in other]
    # ids are the stream's own rows, not positions after the shuffle
    unshuffled = {f"img-{r:02d}" for r in range(len(HF_ROWS))}
    assert {s.sample_id for s in first} <= unshuffled


def test_hf_map_style_seeded_subset_matches_the_generic_shuffle(tmp_path, hf_dataset, run_corpus):
    hf_dataset.save_to_disk(str(tmp_path / "ds"))
    samples, _, _, _ = run_corpus(**hf_corpus(tmp_path / "ds", limit=4, shuffle_seed=3))
    order = list(range(len(HF_ROWS)))
    random.Random(3).shuffle(order)
    # row 3 duplicates row 0: whichever of the two comes first in the shuffle is kept
    first_of_dup = next(r for r in order if r in (0, 3))
    usable = [r for r in order if r not in (4, 5) and (r not in (0, 3) or r == first_of_dup)]
    assert [s.sample_id for s in samples] == [f"img-{r:02d}" for r in usable[:4]]


def test_hf_dataset_dict_split_and_column_errors(tmp_path, hf_dataset, run_corpus):
    from datasets import DatasetDict

    DatasetDict({"train": hf_dataset.select(range(3)), "test": hf_dataset.select(range(6, 9))}).save_to_disk(str(tmp_path / "dd"))
    samples, _, _, _ = run_corpus(out="a", **hf_corpus(tmp_path / "dd", split="test"))
    assert [s.sample_id for s in samples] == ["img-06", "img-07", "img-08"]
    assert [s.source_id for s in samples] == ["img-06", "img-07", "img-08"]
    with pytest.raises(CorpusError, match=r"corpus.split='validation' not in .*splits: train, test"):
        run_corpus(out="b", **hf_corpus(tmp_path / "dd", split="validation"))
    with pytest.raises(CorpusError, match=r"corpus.caption_column='caption': no such column .*columns: image, captions, uid"):
        run_corpus(out="c", kind="hf", path=str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match="no parquet file matches"):
        run_corpus(out="d", kind="hf", path=str(tmp_path / "nothing" / "*.parquet"))


def test_hf_row_ids_and_image_paths_relative_to_image_root(tmp_path, run_corpus, shape, image_bytes):
    from datasets import Dataset

    root = tmp_path / "pictures"
    root.mkdir()
    for i in range(3):
        (root / f"p{i}.png").write_bytes(image_bytes(shape(i), "PNG"))
    Dataset.from_dict({"file": ["p0.png", "p1.png", "gone.png", "p2.png"], "text": ["a", "b", "c", "d"]}).save_to_disk(
        str(tmp_path / "ds")
    )
    samples, skips, _, _ = run_corpus(
        kind="hf", path=str(tmp_path / "ds"), image_column="file", caption_column="text", image_root=str(root)
    )
    assert [s.sample_id for s in samples] == ["train-00000000", "train-00000001", "train-00000003"]
    assert [s.caption for s in samples] == ["a", "b", "d"]
    assert skips[0]["id"] == "train-00000002" and skips[0]["reason"] == "missing_image"
    cfg = CorpusConfig(kind="hf", path=str(tmp_path / "ds"), image_column="file", image_root=str(root))
    assert open_image(samples[2].image_ref, cfg).tobytes() == shape(2).tobytes()


def test_llava_json_with_image_root(tmp_path, run_corpus, shape, image_bytes):
    root = tmp_path / "coco" / "train2017"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"{i:012d}.jpg").write_bytes(image_bytes(shape(i), "JPEG"))
    records = [
        {"id": "000000000000", "image": "000000000000.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat do you see happening in this image?"},
            {"from": "gpt", "value": "A detailed description."},
            {"from": "human", "value": "And the colours?"},
            {"from": "gpt", "value": "Second answer."}]},
        {"id": "000000000001", "image": ["000000000001.jpg"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Another one."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "000000000009", "image": "000000000009.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Missing file."}]},
        {"image": "000000000002.jpg", "conversations": [{"from": "gpt", "value": "No id."}]},
        "not a record",
    ]
    path = tmp_path / "detail_23k.json"
    path.write_text(json.dumps(records))
    samples, skips, counts, _ = run_corpus(out="a", kind="llava-json", path=str(path), image_root=str(root))
    assert [(s.sample_id, s.caption) for s in samples] == [
        ("000000000000", "A detailed description."),
        ("000000000001", "Another one."),
        ("000000000002.jpg", "No id."),
    ]
    assert samples[0].image_ref == str((root / "000000000000.jpg").resolve())
    assert {(r["id"], r["reason"]) for r in skips} == {
        ("text-only", "bad_record"), ("000000000009", "missing_image"), ("record-5", "bad_record")}
    assert next(r for r in skips if r["id"] == "text-only")["source"] == f"{path}[2]"
    assert counts["skipped_bad_record"] == 2
    # caption_index 1: the second assistant turn; records with one answer are skipped
    samples, skips, _, _ = run_corpus(out="b", kind="llava-json", path=str(path), image_root=str(root), caption_index=1)
    assert [(s.sample_id, s.caption) for s in samples] == [("000000000000", "Second answer.")]
    assert "no caption 1 (has 1)" in {r["detail"] for r in skips}
    # JSON lines work too; a broken file and a missing root are clear errors
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n")
    samples, _, _, _ = run_corpus(out="c", kind="llava-json", path=str(jsonl), image_root=str(root))
    assert len(samples) == 2
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(CorpusError, match="not valid JSON"):
        reader_for(CorpusConfig(kind="llava-json", path=str(tmp_path / "bad.json"), image_root=str(root))).fingerprint()
    with pytest.raises(CorpusError, match="corpus.image_root='/nope': folder not found"):
        reader_for(CorpusConfig(kind="llava-json", path=str(path), image_root="/nope"))


def test_folder_list_captions_and_bad_lines(tmp_path, run_corpus, write_folder, shape, image_bytes):
    root = write_folder(
        tmp_path / "corpus",
        [{"image": "a.png", "caption": ["first", "second"]}, {"image": "sub/b.png", "caption": "only"}, {"caption": "no image"}],
        {"a.png": image_bytes(shape(0), "PNG"), "sub/b.png": image_bytes(shape(1), "PNG")},
    )
    (root / "captions.jsonl").write_text((root / "captions.jsonl").read_text() + "{not json\n")
    samples, skips, _, _ = run_corpus(kind="folder", path=str(root))
    assert [(s.sample_id, s.caption) for s in samples] == [("a.png", "first"), ("sub/b.png", "only")]
    assert [(r["id"], r["reason"]) for r in skips] == [("line-3", "bad_record"), ("line-4", "bad_record")]
    assert skips[0]["source"] == f"{root / 'captions.jsonl'}:3"


@pytest.fixture
def ten_image_folder(tmp_path, write_folder, shape, image_bytes):
    """i0..i9, where i4 is missing and i7 repeats i2's pixels."""
    files = {f"i{i}.png": image_bytes(shape(2 if i == 7 else i), "PNG") for i in range(10) if i != 4}
    lines = [{"image": f"i{i}.png", "caption": f"caption {i}"} for i in range(10)]
    return write_folder(tmp_path / "ten", lines, files)


def test_limit_takes_the_first_usable_samples(ten_image_folder, run_corpus):
    samples, skips, _, _ = run_corpus(kind="folder", path=str(ten_image_folder), limit=5)
    assert [s.sample_id for s in samples] == ["i0.png", "i1.png", "i2.png", "i3.png", "i5.png"]
    assert [r["id"] for r in skips] == ["i4.png"]  # reading stops once 5 samples are usable


def test_limit_with_seed_is_a_reproducible_random_subset(ten_image_folder, run_corpus):
    a, _, _, _ = run_corpus(out="a", kind="folder", path=str(ten_image_folder), limit=4, shuffle_seed=1)
    b, _, _, _ = run_corpus(out="b", kind="folder", path=str(ten_image_folder), limit=4, shuffle_seed=1)
    c, _, _, _ = run_corpus(out="c", kind="folder", path=str(ten_image_folder), limit=4, shuffle_seed=2)
    order = list(range(10))
    random.Random(1).shuffle(order)
    expected = []
    for i in order:
        if i == 4 or (i in (2, 7) and any(e in (2, 7) for e in expected)):
            continue
        expected.append(i)
    assert [s.sample_id for s in a] == [f"i{i}.png" for i in expected[:4]]
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    assert [s.sample_id for s in a] != [s.sample_id for s in c]


def test_dedup_by_pixels_and_switching_it_off(ten_image_folder, run_corpus):
    samples, skips, counts, _ = run_corpus(out="a", kind="folder", path=str(ten_image_folder))
    assert len(samples) == 8 and counts["skipped_duplicate_image"] == 1
    dup = next(r for r in skips if r["reason"] == "duplicate_image")
    assert dup["id"] == "i7.png" and dup["detail"] == "same pixels as i2.png"
    samples, skips, counts, _ = run_corpus(out="b", kind="folder", path=str(ten_image_folder), dedup=False)
    assert len(samples) == 9 and "skipped_duplicate_image" not in counts
    by_id = {s.sample_id: s for s in samples}
    assert by_id["i7.png"].image_sha256 == by_id["i2.png"].image_sha256


def test_no_usable_sample_is_a_clear_error(tmp_path, write_folder, run_corpus):
    root = write_folder(tmp_path / "empty", [{"image": "x.jpg", "caption": "x"}, {"image": "y.jpg", "caption": ""}], {})
    with pytest.raises(CorpusError, match=r"yielded no usable sample \(2 skipped: missing_image; see .*skipped.jsonl\)"):
        run_corpus(kind="folder", path=str(root))
    rows = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["x.jpg", "y.jpg"]


def test_images_without_captions_are_used_when_the_model_describes_them(tmp_path, write_folder, run_corpus, shape, image_bytes):
    root = write_folder(
        tmp_path / "uncaptioned",
        [{"image": "a.png"}, {"image": "b.png", "caption": ""}],
        {"a.png": image_bytes(shape(0), "PNG"), "b.png": image_bytes(shape(1), "PNG")},
    )
    samples, skips, _, _ = run_corpus(out="a", kind="folder", path=str(root), text_source="generate")
    assert [s.sample_id for s in samples] == ["a.png", "b.png"] and skips == []
    with pytest.raises(CorpusError, match="2 skipped: empty_caption"):
        run_corpus(out="b", kind="folder", path=str(root), text_source="caption")
