"""Reading the embedded default's attributes back from any image: what a sample shows.

The generator (`synthetic.py`) knows the truth of every picture it drew: a shape of one palette
colour on a background of another. This reader needs no model: it snaps pixels to the palette,
takes the background from the border, the shape from the largest connected region of any other
colour, and the kind from how that region fills its bounding box (square ~1, circle ~pi/4,
triangle ~1/2) and whether it widens downwards. It is how the quality benchmark scores prompt
following, so its own accuracy on generated images is tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image
from scipy import ndimage

from data_pipeline.synthetic import COLORS, attributes_from_caption

PALETTE_NAMES = sorted(COLORS)
PALETTE = np.array([COLORS[name] for name in PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    shape: str | None  # None: no shape found
    color: str | None
    background: str
    cx: float = 0.0  # centre and half-size as fractions of the side, like ShapeAttributes
    cy: float = 0.0
    size: float = 0.0

    def matches(self, truth) -> dict[str, bool]:
        """Per attribute, whether this reading agrees with `truth` (anything with the same fields)."""
        return {key: getattr(self, key) == getattr(truth, key) for key in ("shape", "color", "background")}


def palette_labels(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for every pixel of an (H, W, 3) array."""
    distance = ((pixels[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return distance.argmin(-1)


def read(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB"))
    side = pixels.shape[0]
    labels = palette_labels(pixels)
    ring = max(1, side // 16)
    border = np.concatenate(
        [labels[:ring].ravel(), labels[-ring:].ravel(), labels[:, :ring].ravel(), labels[:, -ring:].ravel()]
    )
    background = int(np.bincount(border, minlength=len(PALETTE_NAMES)).argmax())
    # scipy is unannotated: pyright infers label's other return too, the count alone, given only with `output`
    components, count = cast(tuple[np.ndarray, int], ndimage.label(labels != background))
    if count == 0:
        return Reading(None, None, PALETTE_NAMES[background])
    sizes = np.bincount(components.ravel())[1:]
    largest = components == (int(sizes.argmax()) + 1)
    if largest.sum() < (side * 0.05) ** 2:  # specks, not a shape
        return Reading(None, None, PALETTE_NAMES[background])
    color = PALETTE_NAMES[int(np.bincount(labels[largest], minlength=len(PALETTE_NAMES)).argmax())]
    rows, cols = np.nonzero(largest)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    height, width = bottom - top, right - left
    fill = largest.sum() / float(height * width)
    return Reading(
        shape=_kind(largest[top:bottom, left:right], fill),
        color=color,
        background=PALETTE_NAMES[background],
        cx=(left + right) / 2 / side,
        cy=(top + bottom) / 2 / side,
        size=(height + width) / 4 / side,
    )


def _kind(region: np.ndarray, fill: float) -> str:
    widths = region.sum(1).astype(np.float32)
    third = max(1, len(widths) // 3)
    widens = widths[-third:].mean() > 1.6 * max(widths[:third].mean(), 1.0)
    if widens and fill < 0.7:
        return "triangle"
    return "square" if fill > 0.88 else "circle"


def prompt_following(pictures: list[Image.Image], captions: list[str]) -> tuple[dict[str, float], list[Reading]] | None:
    """Per attribute, the fraction of pictures whose reading is what their caption asked for, and
    the readings; None when a caption is not the embedded generator's (no truth to score against)."""
    named = [attributes_from_caption(c) for c in captions]
    truths = [t for t in named if t is not None]
    if not truths or len(truths) < len(named):
        return None
    readings = [read(p) for p in pictures]
    keys = ("shape", "color", "background")
    return {
        key: float(np.mean([getattr(r, key) == t[i] for r, t in zip(readings, truths, strict=True)]))
        for i, key in enumerate(keys)
    }, readings
