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

PUBLISHED_SCORE_COLUMNS = {
    "simulator": "simulator",
    "score": "score",
    "visual_score": "visual_score",
    "text_score": "text_score",
    "score_status": "status",
    "score_failure": "failure",
    "baseline_score": "baseline_score",
    "baseline_layer": "baseline_layer",
    "baseline_neuron": "baseline_neuron",
    "per_sample_scores": "per_sample_scores",
}
"""Published column of the `explanations` config -> its column in `scores.parquet`.

`score_status` says why a score is null (`failed`: the simulator failed, see
`score_failure`; `undefined`: the true activations were constant), the baseline columns
which neuron's explanation gave the chance baseline."""


def explanations_with_scores(run_dir: Path) -> pa.Table:
    """`explanations.parquet` with the published score columns of `scores.parquet` (left join)."""
    explanations = pq.read_table(Path(run_dir) / "explanations.parquet")
    scores_path = Path(run_dir) / SCORES_FILE
    scores = pq.read_table(scores_path) if scores_path.exists() else SCORES_SCHEMA.empty_table()
    # Joined in Python: pyarrow's join refuses list columns (per_sample_scores) as non-key fields.
    sources = list(PUBLISHED_SCORE_COLUMNS.values())
    by_key = {(r["layer"], r["neuron"]): r for r in scores.select(["layer", "neuron", *sources]).to_pylist()}
    keys = zip(explanations.column("layer").to_pylist(), explanations.column("neuron").to_pylist())
    matched = [by_key.get(k) for k in keys]
    out = explanations
    for published, source in PUBLISHED_SCORE_COLUMNS.items():
        values = [None if m is None else m[source] for m in matched]
        field = SCORES_SCHEMA.field(source)
        out = out.append_column(pa.field(published, field.type), pa.array(values, field.type))
    return out
