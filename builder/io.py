"""Atomic file writes: write to a temporary file in the same folder, then rename.

A kill at any moment leaves either the old file or the new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | Path, table: pa.Table, **kwargs: Any) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write `path` with a function that writes to the path it is given."""
    with atomic_path(path) as tmp:
        writer(tmp)


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append JSON lines and flush them to disk (used for per-item caches and skip logs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON lines, ignoring a torn last line left by a kill mid-append."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """Short hash of JSON-able data, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def public_name(value: str | None) -> str | None:
    """What published data says of a value that may be a local path (a model folder, a
    corpus file): its last part (`/home/me/data/detail_23k.json` -> `detail_23k.json`), so
    that no user's folders are published; Hub ids and names are kept as they are."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith((".", "~")) or path.exists():
        return path.name or value
    return value
