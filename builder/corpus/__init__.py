"""The corpus stage: read an image-caption source, check every sample, write `samples.parquet`.

Readers share one interface (:class:`CorpusReader`): they yield :class:`RawSample`
records whose image is loaded lazily, and they reopen an image later from its
`image_ref`. The stage decodes every image once to check it, converts it to RGB, drops
duplicates and records every skipped sample with its reason in `skipped.jsonl`.
"""

from builder.corpus.base import CorpusReader, RawSample, Sample, SkipReason, open_image, reader_for

__all__ = ["CorpusReader", "RawSample", "Sample", "SkipReason", "open_image", "reader_for"]
