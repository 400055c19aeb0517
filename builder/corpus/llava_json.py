"""`corpus.kind: llava-json`: LLaVA's instruction-tuning JSON (`detail_23k.json`, `llava_v1_5_mix665k.json`).

`corpus.path` is the JSON file (a list of records; `.jsonl`: one record per line) and
`corpus.image_root` the folder the records' `image` paths are relative to (default: the
JSON file's folder). A record looks like

    {"id": "000000215677", "image": "000000215677.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat do you see ...?"},
                       {"from": "gpt", "value": "The image shows ..."}]}

The source id is `id` (else the image path). The captions are the record's assistant
(`gpt`) turns in order, so the caption is the first answer and `corpus.caption_index`
picks a later one. In `detail_23k` the first answer is GPT-4's detailed description of
the COCO image, a good caption for `text.source: caption`; the paper instead has the
model describe each image (`text.source: generate`) and uses the JSON only for its image
list. Text-only records (no `image`) are skipped as `bad_record`; a record with a list of
images uses the first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from builder.config import CorpusConfig
from builder.corpus.base import RawSample, bad_record, register_reader
from builder.errors import CorpusError
from builder.io import file_digest, stable_hash

ASSISTANT_ROLES = ("gpt", "assistant")


@register_reader("llava-json")
class LlavaJsonReader:
    def __init__(self, cfg: CorpusConfig):
        self.cfg = cfg
        self.path = Path(cfg.path).expanduser()
        if not self.path.is_file():
            raise CorpusError(f"corpus.path={cfg.path!r}: LLaVA JSON file not found")
        self.root = Path(cfg.image_root).expanduser() if cfg.image_root else self.path.parent
        if not self.root.is_dir():
            raise CorpusError(f"corpus.image_root={cfg.image_root!r}: folder not found (the images' root, e.g. coco/train2017)")
        self.root = self.root.resolve()

    def _records(self) -> list[Any]:
        text = self.path.read_text(encoding="utf-8")
        try:
            if self.path.suffix == ".jsonl":
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"corpus.path={self.cfg.path!r}: not valid JSON ({e}); expected LLaVA's list of records") from e
        if not isinstance(records, list):
            raise CorpusError(f"corpus.path={self.cfg.path!r}: expected a JSON list of records, got {type(records).__name__}")
        return records

    @staticmethod
    def _image_of(record: Any) -> str:
        image = record.get("image") if isinstance(record, dict) else None
        if isinstance(image, list):
            image = image[0] if image else None
        return image if isinstance(image, str) else ""

    def fingerprint(self) -> str:
        stats = []
        for record in self._records():
            rel = self._image_of(record)
            p = self.root / rel
            st = p.stat() if rel and p.is_file() else None
            stats.append((rel, st.st_size if st else -1, st.st_mtime_ns if st else -1))
        return stable_hash(["llava-json", str(self.path.resolve()), file_digest(self.path), str(self.root), stats])

    def samples(self) -> Iterator[RawSample]:
        for i, record in enumerate(self._records()):
            source = f"{self.path}[{i}]"
            rel = self._image_of(record)
            if not isinstance(record, dict):
                yield RawSample(f"record-{i}", "", [], bad_record(f"record is a {type(record).__name__}"), source)
                continue
            source_id = str(record.get("id") or rel or f"record-{i}")
            if not rel:
                yield RawSample(source_id, "", [], bad_record("record has no image (text-only conversation)"), source)
                continue
            turns = record.get("conversations") or []
            captions = [
                str(t.get("value") or "")
                for t in turns
                if isinstance(t, dict) and t.get("from") in ASSISTANT_ROLES
            ]
            path = (self.root / rel).resolve()
            yield RawSample(source_id, str(path), captions, lambda path=path: path, f"{source} {path}",
                            image_file=str(path))
