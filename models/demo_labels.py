"""Dense per-token training targets for the demo model's image side (training only; nothing is saved).

The demo's CLIP tower is tiny and trained from scratch in minutes. A label per *image* (what the answer
gives) is too weak a signal for it to discover objects, their outlines and their centers, so the
trainer also supervises every merged image token (a 28x28-pixel cell of a 336x336 view, the unit the
decoder sees) with facts that are *local* to that cell:

    cover    fraction of the cell covered by an object                                  [0, 1]
    center   fraction of an object's center dot that falls in the cell; sums to the     [0, 1]
             object count over each view (global view, and over the tiles together)
    edge     fraction of the cell's pixels on an object outline (the shape lives here)   [0, 1]
    valid    fraction of the cell that is image, not the HD transform's white padding   [0, 1]

The masks are drawn at the original size and sent through the runtime's own HD transform, so that
they line up with the pixels exactly (bilinear resize, centered padding, transposes for portraits);
the global view is an area average of the padded mask.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..runtime.image_transform import CROP, hd_transform, to_tiles

CELL = 28  # one merged token: 2x2 patches of 14 pixels
SIDE = CROP // CELL  # 12 cells per side
CHANNELS = ("cover", "center", "edge", "valid")
DOT = 4  # center-dot radius in original pixels


def object_mask(image: Image.Image) -> np.ndarray:
    """bool [h, w]: pixels that differ clearly from the background (the top-left pixel; objects never touch it)."""
    a = np.asarray(image.convert("RGB")).astype(np.int16)
    return np.abs(a - a[0, 0]).max(-1) > 60


def dense_labels(image: Image.Image, centers: list[tuple[float, float]], num_crops: int) -> np.ndarray:
    """-> float32 [1 + tiles, 12, 12, 4] (CHANNELS), views in the processor's order (global view first)."""
    w, h = image.size
    mask = object_mask(image)
    m_img = Image.fromarray(mask.astype(np.uint8) * 255)
    edge = np.asarray(m_img) > np.asarray(m_img.filter(ImageFilter.MinFilter(3)))  # outline, 1-2 px wide
    dots = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(dots)
    for cx, cy in centers:
        draw.ellipse([cx - DOT, cy - DOT, cx + DOT, cy + DOT], fill=255)
    rgb = np.stack([mask.astype(np.uint8) * 255, np.asarray(dots), edge.astype(np.uint8) * 255], -1)
    hd = hd_transform(Image.fromarray(rgb), num_crops).astype(np.float32) / 255  # [H, W, 3]
    pad = hd_transform(Image.new("RGB", (w, h)), num_crops)[..., 0] > 127  # the padding is white
    hd[pad] = 0
    hd = np.concatenate([hd, (~pad)[..., None].astype(np.float32)], -1)  # [H, W, 4]
    glob = np.stack([np.asarray(Image.fromarray(hd[..., c]).resize((CROP, CROP), Image.Resampling.BOX))
                     for c in range(hd.shape[-1])], -1)  # [336, 336, 4]
    views = np.concatenate([glob[None], to_tiles(hd.transpose(2, 0, 1)).transpose(0, 2, 3, 1)])  # [V, 336, 336, 4]
    cells = views.reshape(len(views), SIDE, CELL, SIDE, CELL, -1).mean((2, 4))  # [V, 12, 12, 4]
    n = max(1, len(centers))
    for sl in (slice(0, 1), slice(1, None)):  # each object's dot sums to 1 over the global view / the tiles
        mass = cells[sl, ..., 1].sum() / n
        if mass > 0:
            cells[sl, ..., 1] /= mass
    return cells.astype(np.float32)
