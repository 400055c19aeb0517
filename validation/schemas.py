"""Expected arrow schemas of the configs, derived from the package's `datasets.Features`."""

from __future__ import annotations

import pyarrow as pa


def expected_schemas() -> dict[str, pa.Schema]:
    from builder.classify import CATEGORIES
    from builder.package import features as F

    return {
        "neurons": F.NEURONS.arrow_schema,
        "layers": F.layers_features(CATEGORIES).arrow_schema,
        "samples": F.SAMPLES.arrow_schema,
    }
