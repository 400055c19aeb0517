"""Writing one config as parquet shards sized for the Hub's dataset viewer.

Shards rotate by size (`package.max_shard_mb`), row groups stay small enough for the
viewer to page through (`package.row_group_mb`, and at most `package.image_rows_per_group`
rows when rows carry images), every file has a page index and statistics, and the layout
depends only on the table: the same table always gives byte-identical files. Sizes are
the table's uncompressed Arrow bytes, known before writing, so shard names
(`train-00000-of-00003.parquet`) can say how many shards there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image

from builder.io import write_with

MB = 1_000_000


@dataclass(frozen=True)
class ParquetLimits:
    """Size limits of shards and row groups, in uncompressed Arrow bytes."""

    max_shard_bytes: int
    """A shard holds at most this many bytes (one row group at least)."""
    row_group_bytes: int
    """A row group holds at most this many bytes (one row at least)."""
    image_rows_per_group: int
    """A row group of a config with images holds at most this many rows."""


@dataclass(frozen=True)
class ShardLayout:
    """Where a table's rows go."""

    rows_per_group: int
    """Rows per parquet row group (the last group of a shard may be smaller)."""
    shards: tuple[tuple[int, int], ...]
    """(first row, number of rows) of each shard, in order."""


def shard_name(index: int = 0, total: int = 1) -> str:
    return f"train-{index:05d}-of-{total:05d}.parquet"


def has_images(features: Features) -> bool:
    return any(isinstance(f, Image) for f in features.values())


def plan_layout(table: pa.Table, features: Features, limits: ParquetLimits) -> ShardLayout:
    """Row groups of at most `row_group_bytes`, shards of whole row groups up to `max_shard_bytes`."""
    n = table.num_rows
    if n == 0:
        return ShardLayout(1, ((0, 0),))
    row_bytes = max(table.nbytes / n, 1.0)
    rows_per_group = max(1, int(limits.row_group_bytes // row_bytes))
    if has_images(features):
        rows_per_group = min(rows_per_group, limits.image_rows_per_group)
    rows_per_group = min(rows_per_group, n)
    groups_per_shard = max(1, int(limits.max_shard_bytes // (rows_per_group * row_bytes)))
    rows_per_shard = rows_per_group * groups_per_shard
    count = math.ceil(n / rows_per_shard)
    return ShardLayout(rows_per_group, tuple((i * rows_per_shard, min(rows_per_shard, n - i * rows_per_shard))
                                             for i in range(count)))


def write_shards(folder: Path, table: pa.Table, features: Features, limits: ParquetLimits) -> list[Path]:
    """Write `table` (already cast to `features`) as `folder/train-*.parquet`; return the paths."""
    layout = plan_layout(table, features, limits)
    paths = []
    for i, (start, length) in enumerate(layout.shards):
        path = folder / shard_name(i, len(layout.shards))
        shard = table.slice(start, length)
        write_with(
            path,
            lambda tmp, shard=shard: pq.write_table(
                shard,
                tmp,
                row_group_size=layout.rows_per_group,
                compression="zstd",
                write_statistics=True,
                write_page_index=True,
                # Chunk boundaries follow the content, so a new version of a shard shares
                # most of its bytes with the old one and the Hub's Xet storage dedups them.
                use_content_defined_chunking=True,
            ),
        )
        paths.append(path)
    return paths
