"""Batched HD transform for frames that share one size (the frames of a video clip). Torch-free.

`preprocess_same_size(frames, num_crops)` gives exactly what `image_transform.preprocess_images` gives for
the same frames (pixel_values bit for bit, image_sizes, token counts), with everything that depends only on
the size worked out once for the clip:

    one geometry: resize shape, padding, tile grid, bicubic taps (hd_resize_size of the shared size)
    one padded uint8 canvas [H, W, 3]: the white padding is written once, each frame's resize
        (PIL bilinear, as the reference) lands in its rows
    one float32 buffer [3, H, W] for the normalised frame: normalisation as three in-place float32
        operations (x / 255, - mean, / std: the same operations that build the per-image lookup table,
        so the same values) instead of a table gather
    the global view's bicubic resize with strided slices instead of gathers (the scale is an integer:
        H and W are multiples of 336), the border outputs with the same gathers as resize_bicubic
    pixel_values written in place: the global view and the tiles go straight into [N, crops+1, 3, 336, 336]

Frames run through these buffers one at a time: one [N, 3, H, W] stack of a whole clip is tens of MB
and falls out of the cache (measured slower: benchmarks/results/video-preprocess-2026-12-01.md).
Every float is the result of the same float32 operations in the same order as the per-image path, so the
outputs are identical, not just close. Images of different sizes are batched per size, so any list of
images may go through here (a drop-in for preprocess_images).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from .image_layout import CROP, image_grid, num_image_tokens
from .image_transform import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    DEFAULT_NUM_CROPS,
    ImageInput,
    bicubic_taps,
    check_num_crops,
    hd_resize_size,
    load_image,
)


def _regular(taps: np.ndarray, w: np.ndarray, in_size: int):
    """(base, stride) when output o's tap j is clamp(base + stride*o + j, 0, in_size-1) and all outputs share
    one weight row (an integer downscale); None otherwise."""
    out = taps.shape[0]
    if out == 0 or in_size % out or not np.all(w == w[0]):
        return None
    stride = in_size // out
    base = int(taps[0, 1]) - 1  # tap 1 of output 0 is never clamped at the start
    want = np.clip(base + stride * np.arange(out)[:, None] + np.arange(4)[None, :], 0, in_size - 1)
    return (base, stride) if np.array_equal(want, taps) else None


class _AxisResize:
    """Bicubic along one axis of a float32 array (torch-compatible, 4 taps: image_transform.bicubic_taps),
    computing every output as resize_bicubic does: tap 0 times its weight, then += each further tap times
    its weight, in float32. Interior outputs of an integer downscale read strided slices; the rest gather."""

    def __init__(self, in_size: int, out_size: int):
        self.in_size, self.out_size = in_size, out_size
        self.taps, self.w = bicubic_taps(in_size, out_size)  # [out, 4] each
        reg = _regular(self.taps, self.w, in_size)
        self.lo = self.hi = 0  # interior outputs [lo, hi) use slices
        if reg is not None:
            base, stride = reg
            o = np.arange(out_size)
            inside = (base + stride * o >= 0) & (base + stride * o + 3 <= in_size - 1)
            if inside.any():
                self.lo, self.hi = int(o[inside][0]), int(o[inside][-1]) + 1
                self.base, self.stride = base, stride
        self.edge = np.r_[0:self.lo, self.hi:out_size].astype(np.int64)  # outputs computed with gathers

    def __call__(self, x: np.ndarray, axis: int, out: np.ndarray) -> np.ndarray:
        def sl(a, s):
            idx = [slice(None)] * a.ndim
            idx[axis] = s
            return a[tuple(idx)]

        if self.hi > self.lo:
            dst = sl(out, slice(self.lo, self.hi))
            n = self.hi - self.lo
            tmp = np.empty_like(dst)
            for j in range(4):
                s = self.base + self.stride * self.lo + j
                src = sl(x, slice(s, s + self.stride * (n - 1) + 1, self.stride))
                wj = self.w[0, j]
                if j == 0:
                    np.multiply(src, wj, out=dst)
                else:
                    np.multiply(src, wj, out=tmp)
                    dst += tmp
        if self.edge.size:
            shape = [1] * x.ndim
            shape[axis] = self.edge.size
            taps, w = self.taps[self.edge], self.w[self.edge]
            y = np.take(x, taps[:, 0], axis=axis) * w[:, 0].reshape(shape)
            for j in range(1, 4):
                y += np.take(x, taps[:, j], axis=axis) * w[:, j].reshape(shape)
            idx = [slice(None)] * x.ndim
            idx[axis] = self.edge
            out[tuple(idx)] = y
        return out


def resize_bicubic_fast(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """image_transform.resize_bicubic (float32 [C, H, W] -> [C, out_h, out_w]), bit for bit, with slices."""
    c, h, w = x.shape
    y = _AxisResize(h, out_h)(x, 1, np.empty((c, out_h, w), np.float32))
    return _AxisResize(w, out_w)(y, 2, np.empty((c, out_h, out_w), np.float32))


def preprocess_same_size(
    frames: Sequence[ImageInput],
    num_crops: int = DEFAULT_NUM_CROPS,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """preprocess_images, bit for bit, with the geometry, padding and buffers set up once per image size:
    (pixel_values [N, num_crops+1, 3, 336, 336] float32, image_sizes [N, 2] int64 (H, W), num_img_tokens
    list[int]), images in the order given. Mixed sizes are batched per size."""
    num_crops = check_num_crops(num_crops)
    rgb = [load_image(im, max_pixels) for im in frames]  # all loaded first: fail before heavy work
    pixel_values = np.zeros((len(rgb), num_crops + 1, 3, CROP, CROP), dtype=np.float32)
    image_sizes = np.zeros((len(rgb), 2), dtype=np.int64)
    tokens = [0] * len(rgb)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(rgb):
        groups.setdefault(im.size, []).append(i)
    for idx in groups.values():
        sizes, n_tok = _same_size([rgb[i] for i in idx], num_crops, mean, std, pixel_values, idx)
        image_sizes[idx] = sizes
        for i in idx:
            tokens[i] = n_tok
    return pixel_values, image_sizes, tokens


def _same_size(rgb: list[Image.Image], num_crops: int, mean, std, pixel_values: np.ndarray,
               where: list[int]) -> tuple[tuple[int, int], int]:
    """The HD transform of RGB images of one size into pixel_values[where[i]]: ((H, W), tokens per image)."""
    # ---- geometry, once
    new_w, new_h, transposed = hd_resize_size(*rgb[0].size, num_crops)
    tar = math.ceil(new_h / CROP) * CROP
    top = int((tar - new_h) / 2)
    h, w = (new_w, tar) if transposed else (tar, new_w)  # padded size in the original orientation
    rows, cols = h // CROP, w // CROP
    n_tiles = rows * cols
    m = np.asarray(mean, dtype=np.float32)  # the float32 values the per-image lookup table uses
    s = np.asarray(std, dtype=np.float32)
    rs_h, rs_w = _AxisResize(h, CROP), _AxisResize(w, CROP)
    # ---- buffers, once
    canvas = np.full((tar, new_w, 3), 255, dtype=np.uint8)  # landscape, white padding written once
    hd = canvas.transpose(1, 0, 2) if transposed else canvas  # [H, W, 3] view in the original orientation
    full = np.empty((3, h, w), dtype=np.float32)  # the normalised frame
    half = np.empty((3, CROP, w), dtype=np.float32)  # after the height pass of the global view
    f255 = np.float32(255.0)
    for row, img in zip(where, rgb):
        if transposed:
            img = img.transpose(Image.Transpose.TRANSPOSE)
        canvas[top: top + new_h] = np.asarray(img.resize((new_w, new_h), Image.Resampling.BILINEAR))
        for c in range(3):  # (v / 255 - mean) / std in float32, as _normalize_lut computes each level
            np.divide(hd[..., c], f255, out=full[c], dtype=np.float32)
            full[c] -= m[c]
            full[c] /= s[c]
        rs_w(rs_h(full, 1, half), 2, pixel_values[row, 0])  # global view
        # tiles row-major: [3, rows, 336, cols, 336] -> [rows*cols, 3, 336, 336]
        pixel_values[row, 1: 1 + n_tiles] = full.reshape(3, rows, CROP, cols, CROP).transpose(1, 3, 0, 2, 4).reshape(
            n_tiles, 3, CROP, CROP)
    return (h, w), num_image_tokens(*image_grid((h, w)))
