"""Where a sample's image tokens sit on a fixed patch grid, per model family.

Capture counts every image-token position as visual (the positions the processor expanded
the image placeholder into, which are exactly where the model writes image features). A
heatmap needs a fixed H x W grid per model, whatever the image's size, so each family says
which of those positions form its base grid:

- LLaVA-1.5 (`llava`): all image tokens, row-major, grid x grid (24 x 24 = 576 for
  CLIP ViT-L/14-336); the grid covers the processor's square view of the image (the centre
  crop, or the padded square when the image processor pads to square).
- LLaVA-NeXT (`llava_next`): the image tokens start with the base-resolution view,
  grid x grid row-major (the whole image resized to a square), followed by the high-res
  tiles cropped to the image's aspect ratio, each tile-grid row ending with one learned
  `image_newline` token. The tile part's shape depends on the image's size, so the
  fixed-shape heatmap uses the base view only; tiles and newlines still count as visual
  positions for classification, as the processor and the model treat them as image tokens.

With `vision_feature_select_strategy="full"` the CLS feature is kept and comes first, one
position before the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from builder.errors import ModelError

Fit = Literal["crop", "pad", "squash"]


@dataclass(frozen=True)
class ImageLayout:
    """How one model family's image tokens map onto its fixed base patch grid."""

    family: str
    """The model config's `model_type` (`llava`, `llava_next`)."""
    height: int
    """Grid rows (image_size / patch_size of the vision tower)."""
    width: int
    """Grid columns."""
    offset: int
    """Visual positions before the grid's first cell (1 for a kept CLS feature, else 0)."""
    exact: bool
    """True when the grid is all of a sample's visual positions (LLaVA-1.5); False when
    more follow it (LLaVA-NeXT's tiles and newlines)."""
    fit: Fit
    """How the image was made square for the grid: `crop` (resize the short side, centre
    crop), `pad` (pad to a centred square, then resize) or `squash` (resize both sides)."""

    @property
    def cells(self) -> int:
        return self.height * self.width

    def grid_indices(self, n_visual: int) -> torch.Tensor:
        """int64 [H*W]: for each grid cell (row-major), its index among a sample's
        `n_visual` visual positions taken in sequence order."""
        needed = self.offset + self.cells
        if n_visual < needed or (self.exact and n_visual != needed):
            want = f"{needed}" if self.exact else f"at least {needed}"
            raise ModelError(
                f"{self.family}: a sample has {n_visual} image tokens, expected {want} for a "
                f"{self.height}x{self.width} grid; the processor and the model config disagree "
                "(check patch_size, vision_feature_select_strategy and num_additional_image_tokens)"
            )
        return torch.arange(self.offset, needed, dtype=torch.int64)

    def heatmap(self, visual_values: torch.Tensor) -> torch.Tensor:
        """[..., H, W]: the grid of a sample's values at its visual positions ([..., n_visual],
        in sequence order)."""
        index = self.grid_indices(visual_values.shape[-1]).to(visual_values.device)
        return visual_values.index_select(-1, index).unflatten(-1, (self.height, self.width))

    def image_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in the original image's pixels that the grid covers;
        may extend past the image for `pad`. Upsample a heatmap onto this box."""
        if self.fit == "squash":
            return (0.0, 0.0, float(width), float(height))
        side = min(width, height) if self.fit == "crop" else max(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)


def _grid(config: Any) -> tuple[int, int]:
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    offset = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    return side, offset


def _llava(config: Any, image_processor: Any) -> ImageLayout:
    side, offset = _grid(config)
    if getattr(image_processor, "do_pad", False):
        fit: Fit = "pad"
    elif getattr(image_processor, "do_center_crop", True):
        fit = "crop"
    else:
        fit = "squash"
    return ImageLayout("llava", side, side, offset, exact=True, fit=fit)


def _llava_next(config: Any, image_processor: Any) -> ImageLayout:
    # The base view is the whole image resized to the tower's square input.
    side, offset = _grid(config)
    return ImageLayout("llava_next", side, side, offset, exact=False, fit="squash")


LAYOUTS = {"llava": _llava, "llava_next": _llava_next}
"""Model families (config `model_type`) and the function that gives their layout."""


def image_layout(config: Any, image_processor: Any = None) -> ImageLayout:
    """The base patch grid of a model family, from the model's config (and, for LLaVA-1.5,
    its image processor, which decides how the image was made square)."""
    family = str(getattr(config, "model_type", ""))
    if family not in LAYOUTS:
        raise ModelError(
            f"model type {family!r}: no image layout for heatmaps (supported: {', '.join(LAYOUTS)}); "
            "add one in builder/models/layout.py"
        )
    return LAYOUTS[family](config, image_processor)


def image_tokens_bound(config: Any) -> int:
    """The most image tokens one sample can have in the language model's sequence.

    LLaVA-1.5: the fixed grid (`image_seq_length`, 576 at 336 px). LLaVA-NeXT: the base view
    plus the tiles of its largest `image_grid_pinpoints` resolution, and a newline token
    closing each row of the tiled grid (an upper bound: the unpadding only removes rows).
    """
    side, _ = _grid(config)
    base = int(getattr(config, "image_seq_length", 0) or side * side)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if str(getattr(config, "model_type", "")) != "llava_next" or not pinpoints:
        return base
    tile = int(config.vision_config.image_size)
    rows, cols = max(((h // tile, w // tile) for h, w in pinpoints), key=lambda rc: rc[0] * rc[1])
    return base + rows * cols * side * side + rows * side
