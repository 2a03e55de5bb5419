"""Where each image token comes from: the `layout_index` input of vision.onnx. Torch-free.

vision.onnx projects every merged crop token (C crops x 144) plus the two separators, giving a
table [C*144 + 2, hidden]; `layout_index` [T] picks its rows in the order the decoder consumes them
(Phi-3.5-vision's sub_glb order). Per image with a rows x cols grid of tiles:
    sub-image grid: 12*rows lines, each 12*cols tile tokens then sub_GN
    glb_GN
    global view:    12 lines, each 12 tokens then sub_GN
which is (rows*cols + 1) * 144 + 1 + (rows + 1) * 12 tokens.
"""
from __future__ import annotations

import numpy as np

from .model_facts import CROP_SIZE as CROP
from .model_facts import MERGED_GRID as GRID  # merged tokens per crop side (336 / 14 / 2)
from .model_facts import TOKENS_PER_CROP, num_image_tokens  # noqa: F401  (one home: runtime/model_facts.py)


def image_grid(image_size) -> tuple[int, int]:
    """(padded height, padded width) -> (rows, cols) of 336-pixel tiles."""
    h, w = int(image_size[0]), int(image_size[1])
    if h <= 0 or w <= 0 or h % CROP or w % CROP:
        raise ValueError(f"image size {h}x{w} is not a positive multiple of {CROP}")
    return h // CROP, w // CROP


def layout_index(grids: list[tuple[int, int]]) -> np.ndarray:
    """grids: (rows, cols) per image in prompt order -> int64 [sum of num_image_tokens] row indices.

    Crops are numbered as vision.onnx receives them: per image, its global view, then its tiles."""
    total_crops = sum(r * c + 1 for r, c in grids)
    sub, glb = total_crops * TOKENS_PER_CROP, total_crops * TOKENS_PER_CROP + 1
    parts, base = [], 0
    for rows, cols in grids:
        R = np.arange(rows * GRID)[:, None]  # line in the sub-image grid
        Cc = np.arange(cols * GRID)[None, :]  # column in the sub-image grid
        crop = base + 1 + (R // GRID) * cols + (Cc // GRID)
        tok = crop * TOKENS_PER_CROP + (R % GRID) * GRID + (Cc % GRID)  # [12*rows, 12*cols]
        sub_lines = np.concatenate([tok, np.full((rows * GRID, 1), sub)], axis=1).ravel()
        g = base * TOKENS_PER_CROP + np.arange(TOKENS_PER_CROP).reshape(GRID, GRID)
        glb_lines = np.concatenate([g, np.full((GRID, 1), sub)], axis=1).ravel()
        parts += [sub_lines, np.array([glb]), glb_lines]
        base += rows * cols + 1
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def valid_crops(pixel_values: np.ndarray, image_sizes: np.ndarray, order=None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """pixel_values [N, crops+1, 3, 336, 336], image_sizes [N, 2] -> (crops [C, 3, 336, 336], grids).

    Keeps only each image's 1 + rows*cols valid crops (zero padding dropped), images in `order`
    (default: 0..N-1; pass the prompt order of the image placeholders)."""
    order = range(len(image_sizes)) if order is None else order
    grids, crops = [], []
    for i in order:
        rows, cols = image_grid(image_sizes[i])
        if 1 + rows * cols > pixel_values.shape[1]:
            raise ValueError(f"image {i + 1}: a {rows}x{cols} grid needs {1 + rows * cols} crops, pixel_values has {pixel_values.shape[1]}")
        grids.append((rows, cols))
        crops.append(pixel_values[i, : 1 + rows * cols])
    return np.concatenate(crops, axis=0), grids
