"""`corpus.kind: hf`: any `datasets` image-caption dataset.

`corpus.path` is one of
- a `save_to_disk` folder (has `state.json` or `dataset_dict.json`): `load_from_disk`;
- parquet file(s): a `.parquet` path or a glob (`data/train-*.parquet`);
- anything else, a Hub id (`nlphuji/flickr30k`) or a local dataset folder: `load_dataset`
  with `corpus.subset`, `corpus.split` and `corpus.revision`.

`corpus.image_column` holds an `Image` feature (read undecoded, so the stage bounds the
size from the header before decoding), image bytes, or a file path (relative paths are
resolved against `corpus.image_root`, else the dataset folder). `corpus.caption_column`
holds a string or a list of strings. `corpus.id_column` gives the source id, else
`<split>-<row>`.

How later stages reopen an image (`image_ref`):
- map-style (the default): `hf:<row>`; the opener reloads the dataset (memory-mapped
  Arrow, once per process) and reads that row. No image is copied.
- `corpus.streaming: true`: a stream cannot be reopened by row, and replaying it for each
  batch would re-download it, so the stage stores each *used* image's original bytes
  under the run directory (`corpus-images/<pixel sha256>.<ext>`) and `image_ref` is that
  file. Only the `limit` samples kept are stored, never the whole stream.
"""

from __future__ import annotations

import glob
import random
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from builder.config import CorpusConfig
from builder.corpus.base import (
    BadRecord,
    ImageData,
    MissingImage,
    RawSample,
    bad_record,
    caption_list,
    register_reader,
)
from builder.errors import CorpusError
from builder.io import stable_hash

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
ROW = "__builder_row__"
"""Column added to a stream: the row's position in the unshuffled stream."""
ROWS_PER_READ = 1000
"""Caption/id rows read per call in map-style iteration."""


def source_kind(path: str) -> str:
    """`disk` (save_to_disk folder), `parquet` (file(s) or glob) or `load_dataset` (Hub id, local folder)."""
    p = Path(path).expanduser()
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        return "disk"
    if path.endswith(".parquet") or any(c in path for c in "*?["):
        return "parquet"
    if p.exists() or HUB_ID.match(path):
        return "load_dataset"
    raise CorpusError(f"corpus.path={path!r}: not a local dataset folder, parquet file(s) or Hub dataset id")


def _parquet_files(path: str) -> list[str]:
    files = sorted(glob.glob(str(Path(path).expanduser())))
    if not files:
        raise CorpusError(f"corpus.path={path!r}: no parquet file matches")
    return files


def _load(cfg: CorpusConfig, streaming: bool) -> Any:
    """The split as a `Dataset` (or `IterableDataset` when streaming), images left undecoded."""
    return _load_cached(cfg.path, cfg.subset, cfg.split, cfg.revision, streaming, cfg.image_column)


@lru_cache(maxsize=4)
def _load_cached(path: str, subset: str | None, split: str, revision: str | None, streaming: bool, image_column: str):
    import datasets

    kind = source_kind(path)
    try:
        if kind == "disk":
            ds = datasets.load_from_disk(str(Path(path).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise CorpusError(f"corpus.split={split!r} not in {path!r}; splits: {', '.join(ds)}")
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset()
        elif kind == "parquet":
            ds = datasets.load_dataset("parquet", data_files={split: _parquet_files(path)}, split=split, streaming=streaming)
        else:
            local = Path(path).expanduser()
            ds = datasets.load_dataset(
                str(local) if local.exists() else path, name=subset, split=split, revision=revision, streaming=streaming
            )
    except CorpusError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, HTTP errors)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorpusError(
            f"corpus.path={path!r} (split {split!r}): cannot load the dataset ({first}); check the path, "
            "corpus.split, corpus.subset and network access to the Hub"
        ) from e
    features = ds.features
    if features is not None and image_column in features and isinstance(features[image_column], datasets.Image):
        # Undecoded {"bytes", "path"}: the stage checks the size before decoding.
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _check_columns(cfg: CorpusConfig, columns: Iterable[str]) -> None:
    columns = list(columns)
    wanted = {"corpus.image_column": cfg.image_column, "corpus.caption_column": cfg.caption_column}
    if cfg.id_column:
        wanted["corpus.id_column"] = cfg.id_column
    for key, col in wanted.items():
        if col not in columns:
            raise CorpusError(f"{key}={col!r}: no such column in {cfg.path!r}; columns: {', '.join(columns)}")


def _image_data(value: Any, root: Path | None) -> ImageData:
    """An image cell as something `load_rgb` decodes."""
    if value is None:
        raise MissingImage("the image cell is empty")
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            raise MissingImage("the image cell has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        path = Path(value).expanduser()
        return path if path.is_absolute() or root is None else root / path
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    raise BadRecord(f"image cell is a {type(value).__name__}, expected an Image feature, bytes or a path")


def _root(cfg: CorpusConfig) -> Path | None:
    return _root_of(cfg.path, cfg.image_root)


@lru_cache(maxsize=4)
def _root_of(path: str, image_root: str | None) -> Path | None:
    """Folder that relative image paths in the dataset are resolved against (None: a Hub dataset)."""
    if image_root:
        return Path(image_root).expanduser().resolve()
    p = Path(path).expanduser()
    if source_kind(path) == "parquet":
        return Path(_parquet_files(path)[0]).parent.resolve()
    return p.resolve() if p.is_dir() else None


def _open(image_ref: str, cfg: CorpusConfig) -> ImageData:
    # image_ref = "hf:<row>" of the map-style dataset
    row = int(image_ref.removeprefix("hf:"))
    return _image_data(_load(cfg, streaming=False)[row][cfg.image_column], _root(cfg))


@register_reader("hf", opener_scheme="hf", opener=_open)
class HfReader:
    def __init__(self, cfg: CorpusConfig):
        self.cfg = cfg
        self.kind = source_kind(cfg.path)  # fails early on a path that is nothing

    @property
    def persists_images(self) -> bool:
        """Streamed images are stored under the run directory (see the module docstring)."""
        return self.cfg.streaming

    @property
    def num_rows(self) -> int | None:
        return None if self.cfg.streaming else len(_load(self.cfg, streaming=False))

    def fingerprint(self) -> str:
        cfg = self.cfg
        what = ["hf", cfg.path, cfg.subset, cfg.split, cfg.revision]
        p = Path(cfg.path).expanduser()
        if self.kind == "parquet":
            files = [Path(f) for f in _parquet_files(cfg.path)]
        elif p.exists():
            files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
        else:
            files = []
            what.append(_hub_sha(cfg))
        what.append([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
        return stable_hash(what)

    def samples(self) -> Iterator[RawSample]:
        return self.ordered(None)

    def ordered(self, seed: int | None) -> Iterator[RawSample]:
        """The samples in row order, or shuffled by `seed` (exactly for a map-style dataset,
        through a `corpus.shuffle_buffer` buffer for a stream)."""
        if self.cfg.streaming:
            # Number the rows before shuffling: ids and skip records name the stream's own row.
            ds = _load(self.cfg, streaming=True).map(lambda _, i: {ROW: i}, with_indices=True)
            if seed is not None:
                ds = ds.shuffle(seed=seed, buffer_size=self.cfg.shuffle_buffer)
            return self._stream_rows(ds)
        ds = _load(self.cfg, streaming=False)
        _check_columns(self.cfg, ds.column_names)
        order = list(range(len(ds)))
        if seed is not None:
            random.Random(seed).shuffle(order)  # the same permutation as shuffling the listed samples
        return self._map_rows(ds, order)

    def _source(self, row: int) -> str:
        return f"{self.cfg.path} [{self.cfg.split}] row {row}"

    def _id(self, record: dict[str, Any], row: int) -> str:
        if not self.cfg.id_column:
            return f"{self.cfg.split}-{row:08d}"
        value = record[self.cfg.id_column]
        return f"row-{row:08d}" if value is None or str(value) == "" else str(value)

    def _raw(self, record: dict[str, Any], row: int, load, persist: bool, image_ref: str) -> RawSample:
        source_id = self._id(record, row)
        try:
            captions = caption_list(record[self.cfg.caption_column])
        except BadRecord as e:
            return RawSample(source_id, image_ref, [], bad_record(str(e)), self._source(row))
        return RawSample(source_id, image_ref, captions, load, self._source(row), persist=persist)

    def _map_rows(self, ds: Any, order: list[int]) -> Iterator[RawSample]:
        cfg = self.cfg
        text_columns = [cfg.caption_column] + ([cfg.id_column] if cfg.id_column else [])
        texts = ds.select_columns(text_columns)
        images = ds.select_columns([cfg.image_column])
        root = _root(cfg)
        for start in range(0, len(order), ROWS_PER_READ):
            chunk = order[start : start + ROWS_PER_READ]
            columns = texts[chunk]  # one read per chunk, not per row
            for k, row in enumerate(chunk):
                record = {c: columns[c][k] for c in text_columns}
                load = lambda row=row: _image_data(images[row][cfg.image_column], root)  # noqa: E731
                yield self._raw(record, row, load, persist=False, image_ref=f"hf:{row}")

    def _stream_rows(self, ds: Any) -> Iterator[RawSample]:
        root = _root(self.cfg)
        checked = False
        for record in ds:
            row = int(record[ROW])
            if not checked:
                _check_columns(self.cfg, [k for k in record if k != ROW])
                checked = True
            value = record[self.cfg.image_column]
            load = lambda value=value: _image_data(value, root)  # noqa: E731
            # The stream's row number; the stage replaces image_ref with the stored file.
            yield self._raw(record, row, load, persist=True, image_ref=f"hf-stream:{row}")


def _hub_sha(cfg: CorpusConfig) -> str:
    """The Hub commit of the dataset, so a changed remote dataset redoes the corpus ('' offline)."""
    try:
        from huggingface_hub import HfApi

        return str(HfApi().dataset_info(cfg.path, revision=cfg.revision).sha or "")
    except Exception:  # offline, private, or not on the Hub: the id and revision stand in
        return ""
