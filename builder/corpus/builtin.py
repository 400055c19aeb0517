"""`corpus.kind: builtin`: corpora generated in process (`corpus.path: shapes`)."""

from __future__ import annotations

from collections.abc import Iterator

from PIL import Image

from builder.config import CorpusConfig
from builder.corpus.base import RawSample, register_reader
from builder.corpus.shapes import shape_sample
from builder.errors import CorpusError
from builder.io import stable_hash

BUILTIN_CORPORA = {"shapes": shape_sample}


def _open(image_ref: str, cfg: CorpusConfig) -> Image.Image:
    # image_ref = "builtin:<name>/<index>"
    name, index = image_ref.removeprefix("builtin:").split("/")
    return BUILTIN_CORPORA[name](int(index))[0]


@register_reader("builtin", opener_scheme="builtin", opener=_open)
class BuiltinReader:
    def __init__(self, cfg: CorpusConfig):
        if cfg.path not in BUILTIN_CORPORA:
            raise CorpusError(f"corpus.path={cfg.path!r}: unknown built-in corpus; built-ins: {', '.join(BUILTIN_CORPORA)}")
        self.cfg = cfg

    def fingerprint(self) -> str:
        return stable_hash(["builtin", self.cfg.path, self.cfg.size])

    def samples(self) -> Iterator[RawSample]:
        make = BUILTIN_CORPORA[self.cfg.path]
        for i in range(self.cfg.size):
            ref = f"builtin:{self.cfg.path}/{i}"
            yield RawSample(
                source_id=f"{self.cfg.path}-{i:06d}",
                image_ref=ref,
                captions=[make(i)[1]],
                load_image=lambda i=i: make(i)[0],
                source=ref,
            )
