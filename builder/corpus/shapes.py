"""`builtin:shapes`: a deterministic image-caption corpus of coloured shapes drawn with Pillow."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from builder.models.builtin import COLOURS, SHAPES

RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
BACKGROUND = (128, 128, 128)
SIZE = 96


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: str) -> None:
    fill = RGB[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def shape_sample(index: int, seed: int = 0) -> tuple[Image.Image, str]:
    """The image and caption of sample `index`: two shapes, one above or beside the other."""
    rng = random.Random(seed * 1_000_003 + index)
    (c1, c2) = rng.sample(COLOURS, 2)
    s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    r = 18
    if rng.random() < 0.5:  # vertical arrangement
        x = rng.randint(r + 4, SIZE - r - 4)
        first, second = (x, 24), (x, 72)
        relation = "above"
    else:
        y = rng.randint(r + 4, SIZE - r - 4)
        first, second = (24, y), (72, y)
        relation = "left of"
    for (cx, cy), shape, colour in ((first, s1, c1), (second, s2, c2)):
        _draw(draw, shape, (cx - r, cy - r, cx + r, cy + r), colour)
    return image, f"a {c1} {s1} {relation} a {c2} {s2}"
