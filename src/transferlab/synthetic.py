"""Procedural JPEG dataset: one shape and colour per class, at a random place and size, with noise.

Written in the same `<class>/<file>.jpg` layout as a real dataset, so tests and the demo run
the real decode path offline. Every image is drawn from its own seed (dataset seed, class,
index), so the output is byte-identical for a seed and independent of generation order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from transferlab.config import SyntheticConfig

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
NOISE_STD = 12.0


@dataclass(frozen=True)
class ShapeClass:
    """A class of the synthetic dataset: what is drawn, and in which colour."""

    name: str
    shape: str
    rgb: tuple[int, int, int]


# Shapes and colours both differ between classes, so a small CNN separates them in an epoch or two.
CLASSES = (
    ShapeClass("red_circle", "circle", (220, 40, 40)),
    ShapeClass("green_square", "square", (40, 200, 60)),
    ShapeClass("blue_triangle", "triangle", (50, 80, 230)),
    ShapeClass("yellow_cross", "cross", (235, 220, 40)),
    ShapeClass("magenta_ring", "ring", (220, 50, 210)),
    ShapeClass("cyan_diamond", "diamond", (40, 220, 220)),
    ShapeClass("orange_bars", "bars", (245, 140, 30)),
    ShapeClass("white_star", "star", (240, 240, 240)),
)


def generate(cfg: SyntheticConfig, out_dir: Path) -> dict[str, int]:
    """Write `cfg.num_classes` x `cfg.images_per_class` JPEGs under `out_dir`; return counts per class."""
    chosen = CLASSES[: cfg.num_classes]
    total = len(chosen) * cfg.images_per_class
    with tqdm(total=total, desc="generating images", unit="img", disable=None) as bar:
        for index, cls in enumerate(chosen):
            folder = out_dir / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(cfg.images_per_class):
                rng = np.random.default_rng([cfg.seed, index, i])
                draw_image(cls, cfg.image_size, rng).save(folder / f"{cls.name}_{i:04d}.jpg", quality=JPEG_QUALITY)
                bar.update()
    log.info("generated %d synthetic images of %d classes in %s", total, len(chosen), out_dir)
    return {cls.name: cfg.images_per_class for cls in chosen}


def draw_image(cls: ShapeClass, size: int, rng: np.random.Generator) -> Image.Image:
    """One `size` x `size` RGB image of `cls`'s shape on a dim random background, with noise."""
    background = tuple(int(v) for v in rng.integers(10, 90, size=3))
    image = Image.new("RGB", (size, size), background)
    radius = rng.uniform(0.22, 0.38) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    angle = rng.uniform(-0.25, 0.25)  # radians; small, so a square never becomes a diamond
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in cls.rgb)
    _draw_shape(ImageDraw.Draw(image), cls.shape, cx, cy, radius, angle, colour)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, NOISE_STD, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    angle: float,
    colour: tuple[int, ...],
) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, round(r * 0.35)))
    elif shape == "square":
        draw.polygon(_regular_polygon(cx, cy, r * 1.2, 4, angle + math.pi / 4), fill=colour)
    elif shape == "diamond":
        draw.polygon(_regular_polygon(cx, cy, r, 4, angle), fill=colour)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, angle - math.pi / 2), fill=colour)
    elif shape == "star":
        outer = _regular_polygon(cx, cy, r, 5, angle - math.pi / 2)
        inner = _regular_polygon(cx, cy, r * 0.45, 5, angle - math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=colour)
    elif shape == "cross":
        arm = max(2, round(r * 0.35))
        draw.rectangle((cx - r, cy - arm / 2, cx + r, cy + arm / 2), fill=colour)
        draw.rectangle((cx - arm / 2, cy - r, cx + arm / 2, cy + r), fill=colour)
    elif shape == "bars":
        step = 2 * r / 5
        for k in range(0, 5, 2):
            draw.rectangle((cx - r, cy - r + k * step, cx + r, cy - r + (k + 1) * step), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _regular_polygon(cx: float, cy: float, r: float, sides: int, start: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / sides
    return [(cx + r * math.cos(start + k * step), cy + r * math.sin(start + k * step)) for k in range(sides)]
