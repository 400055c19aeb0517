"""The published configs: their `datasets.Features`, one declaration per config.

Validation and packaging both read these, so the schema lives in one place.
"""

from __future__ import annotations

from datasets import Features, List, Value

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
    }
)

LAYERS_BASE = {"layer": Value("int32"), "neurons": Value("int64")}


def layers_features(categories: tuple[str, ...]) -> Features:
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
