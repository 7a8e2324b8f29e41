"""The picture of a trained model's first layer (the paper's appendix C), drawn with Pillow so
that a training process needs no plotting library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TILE = 64  # pixels a side of each unit's image: a 28x28 or 64x64 input is enlarged to about this
GAP = 2  # pixels between tiles


def first_layer(weight: np.ndarray, channels: int, side: int, path: Path, count: int = 25) -> Path:
    """The first ``count`` rows of the embedding (width x C*R*R) as R x R images, the maximum over
    channels, each scaled from its own minimum (black) to its maximum (white), tiled in a square:
    what the first layer responds to."""
    rows = weight[:count].reshape(-1, channels, side, side).max(axis=1)
    low = rows.min(axis=(1, 2), keepdims=True)
    span = np.maximum(rows.max(axis=(1, 2), keepdims=True) - low, 1e-12)
    tiles = np.round(255 * (rows - low) / span).astype(np.uint8)
    n = int(np.ceil(np.sqrt(len(tiles))))
    scale = max(1, TILE // side)
    cell = side * scale + GAP
    sheet = Image.new("L", (n * cell - GAP, n * cell - GAP), color=0)
    for i, tile in enumerate(tiles):
        image = Image.fromarray(tile).resize((side * scale, side * scale), Image.Resampling.NEAREST)
        sheet.paste(image, ((i % n) * cell, (i // n) * cell))
    sheet.save(path, format="PNG")
    return path
