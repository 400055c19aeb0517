"""The scores as the published `explanations` config carries them.

The package stage builds that config from `explanations.parquet` (explain stage) with the
score columns of `scores.parquet` (this stage) joined on (layer, neuron); an explanation
that was not scored (it failed, or the simulate stage did not run) gets nulls.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from builder.simulate.stage import SCORES_FILE, SCORES_SCHEMA

PUBLISHED_SCORE_COLUMNS = ("simulator", "score", "visual_score", "text_score", "baseline_score", "per_sample_scores")
"""The columns of `scores.parquet` that the `explanations` config publishes."""


def explanations_with_scores(run_dir: Path) -> pa.Table:
    """`explanations.parquet` with the published score columns of `scores.parquet` (left join)."""
    explanations = pq.read_table(Path(run_dir) / "explanations.parquet")
    scores_path = Path(run_dir) / SCORES_FILE
    scores = pq.read_table(scores_path) if scores_path.exists() else SCORES_SCHEMA.empty_table()
    # Joined in Python: pyarrow's join refuses list columns (per_sample_scores) as non-key fields.
    by_key = {(r["layer"], r["neuron"]): r for r in scores.select(["layer", "neuron", *PUBLISHED_SCORE_COLUMNS]).to_pylist()}
    keys = zip(explanations.column("layer").to_pylist(), explanations.column("neuron").to_pylist())
    matched = [by_key.get(k) for k in keys]
    out = explanations
    for name in PUBLISHED_SCORE_COLUMNS:
        values = [None if m is None else m[name] for m in matched]
        out = out.append_column(SCORES_SCHEMA.field(name), pa.array(values, SCORES_SCHEMA.field(name).type))
    return out
