"""The paper's per-layer analyses (METHOD.md section 7) as PNG plots for the dataset card.

`render_plots` draws, from the `neurons` and `layers` tables:

1. `category_fractions.png`: per layer, the fractions of visual / text / multimodal /
   unknown neurons (stacked bars).
2. `high_confidence.png`: per layer, the number of high-confidence neurons of each category.
3. `top_confident_layers.png`: for each of visual, text and multimodal, how the top 3 % most
   confident neurons of that category are spread over the layers (share per layer). The
   confidence takes few values (multiples of 1/N), so neurons tied with the last one kept
   are all kept: the share is over at least 3 % of the category, and the legend gives the
   count. Unknown is left out: its most confident neurons are mostly dead ones.

Drawn with matplotlib's Agg canvas (no pyplot, no global state) at a fixed size and dpi,
with no software/date metadata, so the same tables give byte-identical PNG files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from builder.classify import CATEGORIES
from builder.io import write_with

COLOURS = {"visual": "#1f77b4", "text": "#ff7f0e", "multimodal": "#2ca02c", "unknown": "#9e9e9e"}
"""One colour per category, the same in every plot."""
TOP_CATEGORIES = ("visual", "text", "multimodal")
"""Categories of the top-confidence analysis."""
FIGSIZE = (8.0, 4.5)
DPI = 110


@dataclass(frozen=True)
class Plot:
    """One rendered plot."""

    title: str
    """Title drawn on the plot, also usable as the card's heading or alt text."""
    filename: str
    """File name inside the folder given to `render_plots` (e.g. `category_fractions.png`)."""
    description: str
    """One sentence saying what the plot shows, for the card."""


def top_confident(neurons: pa.Table, category: str, fraction: float = 0.03) -> np.ndarray:
    """Layers of the `fraction` most confident neurons of `category` (ties at the cut kept)."""
    cats = np.asarray(neurons.column("category").to_pylist(), dtype=object)
    mine = cats == category
    if not mine.any():
        return np.zeros(0, dtype=np.int64)
    conf = neurons.column("confidence").to_numpy()[mine]
    layers = neurons.column("layer").to_numpy()[mine]
    k = max(1, math.ceil(fraction * len(conf)))
    cutoff = np.sort(conf)[::-1][k - 1]
    return layers[conf >= cutoff].astype(np.int64)


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _layer_ticks(ax, layers: np.ndarray) -> None:
    if len(layers) == 0:
        return
    step = max(1, math.ceil(len(layers) / 16))
    ax.set_xticks(layers[::step])
    ax.set_xlim(layers.min() - 0.6, layers.max() + 0.6)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    # No "Software" (matplotlib version) or date metadata: the bytes depend on the data only.
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None}))


def _stacked(ax, layers: np.ndarray, series: dict[str, np.ndarray]) -> None:
    bottom = np.zeros(len(layers))
    for c, values in series.items():
        ax.bar(layers, values, bottom=bottom, color=COLOURS[c], label=c, width=0.8)
        bottom = bottom + values
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def render_plots(neurons: pa.Table, layers: pa.Table, out_dir: Path, confidence: float,
                 top_fraction: float = 0.03) -> list[Plot]:
    """Write the three analyses as PNG files into `out_dir`; returns them in card order.

    Args:
        neurons: the `neurons` table (layer, category, confidence, high_confidence, ...).
        layers: the `layers` table (layer, frac_<category>, n_high_confidence_<category>).
        out_dir: folder for the PNG files (created), e.g. `dataset_dir / "plots"`.
        confidence: the high-confidence threshold the tables were made with (for labels).
        top_fraction: share of each category's most confident neurons in the third plot.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_layer = layers.sort_by([("layer", "ascending")])
    layer_ids = by_layer.column("layer").to_numpy().astype(np.int64)
    plots = []

    title = "Neuron categories per layer"
    fig, ax = _figure(title, "layer", "fraction of the layer's neurons")
    _stacked(ax, layer_ids, {c: by_layer.column(f"frac_{c}").to_numpy() for c in CATEGORIES})
    ax.set_ylim(0, 1)
    _layer_ticks(ax, layer_ids)
    _save(fig, out_dir / "category_fractions.png")
    plots.append(Plot(title, "category_fractions.png",
                      "Fraction of each layer's neurons in each category (visual, text, multimodal, unknown)."))

    title = f"High-confidence neurons per layer (confidence > {confidence:g})"
    fig, ax = _figure(title, "layer", "high-confidence neurons")
    _stacked(ax, layer_ids, {c: by_layer.column(f"n_high_confidence_{c}").to_numpy() for c in CATEGORIES})
    _layer_ticks(ax, layer_ids)
    _save(fig, out_dir / "high_confidence.png")
    plots.append(Plot(title, "high_confidence.png",
                      f"Number of neurons per layer whose winning fraction exceeds {confidence:g}, by category."))

    pct = f"{top_fraction * 100:g} %"
    title = f"Layers of the top {pct} most confident neurons per category"
    fig, ax = _figure(title, "layer", "share of the category's top neurons")
    for c in TOP_CATEGORIES:
        chosen = top_confident(neurons, c, top_fraction)
        share = np.array([(chosen == layer).sum() for layer in layer_ids]) / max(len(chosen), 1)
        ax.plot(layer_ids, share, marker="o", color=COLOURS[c], label=f"{c} (n={len(chosen)})")
    ax.set_ylim(bottom=0)
    _layer_ticks(ax, layer_ids)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _save(fig, out_dir / "top_confident_layers.png")
    plots.append(Plot(title, "top_confident_layers.png",
                      f"For visual, text and multimodal neurons, the share of each layer among the category's top "
                      f"{pct} by confidence (neurons tied at the cut are kept)."))
    return plots


EXAMPLE_SIDE = 160
"""Pixels per exemplar in a card example strip."""


def exemplar_strip(images: list[bytes], path: Path) -> None:
    """Side by side, `EXAMPLE_SIDE` px high: a neuron's shown activation-modulated exemplars
    (encoded PNG/JPEG bytes), for its row in the card's example table. Written without
    metadata, so the same exemplars give the same file."""
    from io import BytesIO

    from PIL import Image

    tiles = [Image.open(BytesIO(data)).convert("RGB").resize((EXAMPLE_SIDE, EXAMPLE_SIDE)) for data in images]
    gap = 4
    strip = Image.new("RGB", (len(tiles) * (EXAMPLE_SIDE + gap) - gap, EXAMPLE_SIDE), (255, 255, 255))
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * (EXAMPLE_SIDE + gap), 0))
    write_with(path, lambda tmp: strip.save(tmp, format="PNG", optimize=True))
