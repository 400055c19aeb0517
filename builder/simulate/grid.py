"""Images as the VLM's patch grid sees them, masks to per-patch coverage, numbered grids.

A heatmap cell (i, j) covers one patch of the square the VLM's image processor makes of
the image (`ImageLayout.image_box`: the centre crop for LLaVA-1.5, the padded square when
it pads, the whole image when it squashes). Simulators therefore work on that *view*
(the same view the exemplar images are rendered from):
a mask drawn on the view maps onto the grid by area, and a grid drawn on the view lines
up with the patches.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from builder.models.layout import ImageLayout


def simulator_view(image: Image.Image, layout: ImageLayout) -> Image.Image:
    """The part of `image` the patch grid covers, at the image's own resolution: the
    exemplar renderer's view (`builder.exemplars.grid_view`, padding white) without its
    resizing, so detectors see every pixel there is."""
    from builder.exemplars import grid_view

    left, _top, right, _bottom = layout.image_box(*image.size)
    return grid_view(image, layout, max(1, round(right - left)))


def _overlap_weights(pixels: int, cells: int) -> np.ndarray:
    """[cells, pixels]: the fraction of each cell's extent that each pixel covers (rows sum to 1)."""
    edges = np.linspace(0.0, pixels, cells + 1)
    lo = np.maximum(edges[:-1, None], np.arange(pixels)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(pixels)[None, :] + 1)
    overlap = np.clip(hi - lo, 0.0, None)
    return overlap / np.diff(edges)[:, None]


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[H, W] fraction (0-1) of each grid cell's area covered by `mask` ([h, w], bool or 0-1).

    Exact area weighting: a pixel straddling two cells counts in each by its overlap, so
    any view size maps onto any grid.
    """
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [h, w], got shape {m.shape}")
    rows = _overlap_weights(m.shape[0], grid[0])
    cols = _overlap_weights(m.shape[1], grid[1])
    return np.clip(rows @ m @ cols.T, 0.0, 1.0)


def cell_to_patch_map(cells: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Spread a coarse [r, c] cell map onto the [H, W] patch grid: each patch takes the value
    of the cell its centre falls in."""
    r, c = cells.shape
    ri = np.minimum(((np.arange(grid[0]) + 0.5) * r / grid[0]).astype(int), r - 1)
    ci = np.minimum(((np.arange(grid[1]) + 0.5) * c / grid[1]).astype(int), c - 1)
    return cells[np.ix_(ri, ci)].astype(np.float32)


def draw_numbered_grid(view: Image.Image, cells: int, size: int = 512) -> Image.Image:
    """The view resized to `size` px with a `cells` x `cells` grid whose cells are numbered
    1..cells^2 row by row (what the vision-LLM simulator is shown)."""
    img = view.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    step = size / cells
    font = ImageFont.load_default(size=max(10, int(step / 3)))
    for k in range(1, cells):
        x = round(k * step)
        draw.line([(x, 0), (x, size)], fill=(255, 255, 0), width=2)
        draw.line([(0, x), (size, x)], fill=(255, 255, 0), width=2)
    for i in range(cells):
        for j in range(cells):
            xy = (j * step + 3, i * step + 2)
            draw.text(xy, str(i * cells + j + 1), fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return img
