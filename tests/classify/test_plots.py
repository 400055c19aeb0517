"""The per-layer analyses as PNG plots: the numbers they are drawn from, and stable bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from builder.classify import layer_table
from builder.plots import Plot, render_plots, top_confident


def neurons_table(rows: list[tuple[int, str, float]]) -> pa.Table:
    layer, category, confidence = zip(*rows)
    conf = np.asarray(confidence, dtype=np.float32)
    return pa.table({"layer": np.asarray(layer, dtype=np.int32), "neuron": np.arange(len(rows), dtype=np.int32),
                     "category": list(category), "confidence": conf, "high_confidence": conf > 0.8})


def test_top_confident_takes_the_top_share_and_keeps_ties() -> None:
    # 100 visual neurons: confidences 0.00 .. 0.99 in layers 0..4; 3 % = the 3 most confident.
    rows = [(i % 5, "visual", i / 100) for i in range(100)] + [(0, "text", 1.0)]
    table = neurons_table(rows)
    assert sorted(top_confident(table, "visual").tolist()) == sorted([99 % 5, 98 % 5, 97 % 5])
    # Ties at the cut are all kept: 10 neurons share the top confidence.
    tied = neurons_table([(i % 4, "text", 1.0 if i < 10 else 0.5) for i in range(100)])
    assert len(top_confident(tied, "text")) == 10
    assert len(top_confident(table, "multimodal")) == 0
    assert top_confident(table, "visual", fraction=0.5).tolist() == [i % 5 for i in range(50, 100)]


def test_render_plots_writes_readable_stable_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cats = ["visual", "text", "multimodal", "unknown"]
    rows = [(layer, cats[rng.integers(4)], float(rng.integers(0, 21)) / 20) for layer in range(6) for _ in range(50)]
    neurons = neurons_table(rows)
    layers = layer_table(neurons)
    plots = render_plots(neurons, layers, tmp_path / "a", confidence=0.8)
    again = render_plots(neurons, layers, tmp_path / "b", confidence=0.8)
    assert plots == again
    assert [p.filename for p in plots] == ["category_fractions.png", "high_confidence.png", "top_confident_layers.png"]
    assert all(isinstance(p, Plot) and p.title and p.description for p in plots)
    assert "0.8" in plots[1].title and "3 %" in plots[2].title
    for p in plots:
        data = (tmp_path / "a" / p.filename).read_bytes()
        assert data == (tmp_path / "b" / p.filename).read_bytes()
        assert b"matplotlib" not in data.lower()  # no version metadata
        with Image.open(tmp_path / "a" / p.filename) as img:
            assert img.format == "PNG" and img.size[0] > 600 and img.size[1] > 300


def test_plots_change_with_the_numbers(tmp_path: Path) -> None:
    base = [(layer, "visual" if layer < 2 else "text", 1.0) for layer in range(4) for _ in range(10)]
    other = [(layer, "text" if layer < 2 else "visual", 1.0) for layer in range(4) for _ in range(10)]
    a = render_plots(neurons_table(base), layer_table(neurons_table(base)), tmp_path / "a", 0.8)
    render_plots(neurons_table(other), layer_table(neurons_table(other)), tmp_path / "b", 0.8)
    for p in a:
        assert (tmp_path / "a" / p.filename).read_bytes() != (tmp_path / "b" / p.filename).read_bytes()
