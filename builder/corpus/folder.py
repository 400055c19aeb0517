"""`corpus.kind: folder`: a directory with `captions.jsonl`, one line per image:
`{"image": "relative/path.jpg", "caption": "..."}` (`caption` may also be a list)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from builder.config import CorpusConfig
from builder.corpus.base import BadRecord, RawSample, bad_record, caption_list, register_reader
from builder.errors import CorpusError
from builder.io import file_digest, stable_hash


@register_reader("folder")
class FolderReader:
    def __init__(self, cfg: CorpusConfig):
        self.cfg = cfg
        self.root = Path(cfg.path).expanduser()
        if not self.root.is_dir():
            raise CorpusError(f"corpus.path={cfg.path!r}: folder not found (expected a directory with captions.jsonl)")
        self.index = self.root / "captions.jsonl"
        if not self.index.is_file():
            raise CorpusError(f"corpus.path={cfg.path!r}: no captions.jsonl in the folder (one JSON line per image)")

    def fingerprint(self) -> str:
        stats = []
        for line in self.index.read_text(encoding="utf-8").splitlines():
            try:
                rel = json.loads(line).get("image", "")
            except (json.JSONDecodeError, AttributeError):
                continue
            p = self.root / str(rel)
            stats.append((str(rel), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns if p.is_file() else -1))
        return stable_hash(["folder", str(self.root.resolve()), file_digest(self.index), stats])

    def samples(self) -> Iterator[RawSample]:
        for lineno, line in enumerate(self.index.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            source = f"{self.index}:{lineno}"
            try:
                record = json.loads(line)
                rel = str(record["image"])
                captions = caption_list(record.get("caption"))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, BadRecord) as e:
                yield RawSample(f"line-{lineno}", "", [], bad_record(f"{type(e).__name__}: {e}"), source)
                continue
            path = (self.root / rel).resolve()
            # The path, not the bytes: the size is checked from the header before decoding.
            yield RawSample(rel, str(path), captions, lambda path=path: path, str(path), image_file=str(path))
