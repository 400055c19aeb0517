"""The published configs' `datasets.Features`: the one declaration of every column's type.

Packaging casts each config to these Features (so a wrong type or a wrong heatmap shape
fails at write time), the parquet files carry them as `huggingface` schema metadata (so
`load_dataset` decodes images and fixed-shape lists), the card lists them, and validation
compares every file against them.

Stages that produce a config's source file in the run directory (see
`builder.package.configs.CONFIGS`) write the columns declared here:

- `exemplars.parquet` (exemplars stage): :func:`exemplars_features` of the model's image
  grid. `image` may be PNG/JPEG bytes (a `binary` column) or the `{bytes, path}` struct;
  `heatmap` is H x W on the 0-10 scale, H x W being the model's patch grid.
- `explanations.parquet` (explain stage, scores added by the simulate stage):
  :data:`EXPLANATIONS`. The score columns may be absent before simulation (they are
  published as nulls).
"""

from __future__ import annotations

from datasets import Features, Image, List, Value

NEURONS = Features(
    {
        "layer": Value("int32"),
        "neuron": Value("int32"),
        "category": Value("string"),
        "p_visual": Value("float32"),
        "p_text": Value("float32"),
        "p_multimodal": Value("float32"),
        "p_unknown": Value("float32"),
        "confidence": Value("float32"),
        "high_confidence": Value("bool"),
        "max_activation": Value("float32"),
        "mean_visual": Value("float32"),
        "mean_text": Value("float32"),
        "n_top": Value("int32"),
        "dead": Value("bool"),
        "top_sample_ids": List(Value("string")),
        # The significance test's columns (builder.classify.SIGNIFICANCE_COLUMNS): null when
        # `classify.significance` is off, so the schema is the same for every build.
        "visual_minus_text": Value("float32"),
        "p_value_visual_vs_text": Value("float32"),
        "p_value_category": Value("float32"),
    }
)

LAYERS_BASE = {"layer": Value("int32"), "neurons": Value("int64")}


def layers_features(categories: tuple[str, ...]) -> Features:
    """One row per layer: counts, fractions and high-confidence counts per category."""
    feats = dict(LAYERS_BASE)
    for c in categories:
        feats[f"n_{c}"] = Value("int64")
        feats[f"frac_{c}"] = Value("float64")
        feats[f"n_high_confidence_{c}"] = Value("int64")
    feats["n_high_confidence"] = Value("int64")
    return Features(feats)


SAMPLES = Features(
    {
        "sample_id": Value("string"),
        "source_id": Value("string"),
        "text": Value("string"),
        "text_source": Value("string"),
        "caption": Value("string"),
    }
)

EXEMPLAR_ROLES = ("shown", "held_out")
"""`shown`: given to the explainer; `held_out`: kept back to score the explanation."""


def exemplars_features(grid: tuple[int, int]) -> Features:
    """One row per (neuron, rank) for a model whose image-token grid is `grid` = (H, W).

    The heatmap is a fixed-length nested list, not `Array2D`: `Array2D` does not check
    shapes on write, a fixed-length `List` refuses a wrong shape when the table is cast.
    """
    height, width = grid
    return Features(
        {
            "layer": Value("int32"),
            "neuron": Value("int32"),
            "rank": Value("int32"),
            "sample_id": Value("string"),
            "role": Value("string"),
            "image": Image(),
            "heatmap": List(List(Value("float32"), length=width), length=height),
            "tokens": List(Value("string")),
            "token_activations": List(Value("float32")),
        }
    )


def heatmap_grid(features: Features) -> tuple[int, int]:
    """The (H, W) that an exemplars Features declares for `heatmap`."""
    outer = features["heatmap"]
    return int(outer.length), int(outer.feature.length)


EXPLANATION_STATUSES = ("ok", "failed")
"""`ok`: `explanation` holds the text; `failed`: `failure` says why and `explanation` is null."""

SCORE_MODALITIES = ("visual", "text")
"""`per_sample_scores.modality`."""
SCORED_SAMPLE_ROLES = ("held_out", "random")
"""`per_sample_scores.role`: a held-out top exemplar, or a random sample outside the top-N."""

EXPLANATIONS = Features(
    {
        "layer": Value("int32"),
        "neuron": Value("int32"),
        "category": Value("string"),
        "explanation": Value("string"),
        "explainer": Value("string"),
        "prompt_version": Value("string"),
        "status": Value("string"),
        "failure": Value("string"),
        "simulator": Value("string"),
        "score": Value("float32"),
        "visual_score": Value("float32"),
        "text_score": Value("float32"),
        "score_status": Value("string"),
        "score_failure": Value("string"),
        "baseline_score": Value("float32"),
        "baseline_layer": Value("int32"),
        "baseline_neuron": Value("int32"),
        "per_sample_scores": List(
            {
                "sample_id": Value("string"),
                "modality": Value("string"),
                "role": Value("string"),
                "score": Value("float32"),
            }
        ),
    }
)

EXPLANATION_SCORE_COLUMNS = (
    "simulator",
    "score",
    "visual_score",
    "text_score",
    "baseline_score",
    "per_sample_scores",
)
"""Written by the simulate stage; null in a dataset packaged before simulation."""
