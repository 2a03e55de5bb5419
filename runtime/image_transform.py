"""Torch-free Phi-3.5-vision image preprocessing: image loading, HD transform, normalisation, global view and tiles."""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .image_layout import CROP, image_grid, num_image_tokens  # CROP: side of one CLIP crop (ViT-L/14-336) in pixels

NUM_CROPS_MIN, NUM_CROPS_MAX = 1, 16
DEFAULT_NUM_CROPS = 4
# Refuse images above this many pixels (decompression bombs). Configurable per call / processor.
DEFAULT_MAX_PIXELS = 64_000_000

# CLIP normalisation (the values in Phi-3.5-vision's preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# np.ndarray: uint8 [H, W, C] (C = 1, 3 or 4, channels last) or [H, W] (grey), see `array_to_image`
ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]
ARRAY_FORMS = "a uint8 numpy array of shape [H, W, 3] (RGB), [H, W, 4] (RGBA), [H, W, 1] or [H, W] (grey)"

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(InputError):
    """A bad image input (unreadable, empty, too large, unsupported mode or array shape). An InputError (ValueError)."""


def check_num_crops(num_crops) -> int:
    """Return num_crops as an int, or raise ValueError unless it is an integer in 1..16."""
    if isinstance(num_crops, bool) or not isinstance(num_crops, (int, np.integer)):
        raise ValueError(f"num_crops must be an integer in {NUM_CROPS_MIN}..{NUM_CROPS_MAX}, got {num_crops!r}")
    if not NUM_CROPS_MIN <= int(num_crops) <= NUM_CROPS_MAX:
        raise ValueError(f"num_crops must be in {NUM_CROPS_MIN}..{NUM_CROPS_MAX}, got {num_crops}")
    return int(num_crops)


# --------------------------------------------------------------------------------------------- loading


def array_to_image(a: np.ndarray) -> Image.Image:
    """A uint8 numpy image, [H, W, C] (C = 1, 3 or 4, channels last) or [H, W], -> a PIL image (a copy:
    later changes to the array do not reach it). ImageError for any other dtype or shape, saying which
    forms are accepted (a list of arrays is several images; one [N, H, W, C] array is not accepted)."""
    if not isinstance(a, np.ndarray):
        raise ImageError(f"expected a numpy array, got {type(a).__name__}")
    shape = "x".join(str(d) for d in a.shape) or "()"
    if a.dtype != np.uint8:
        hint = " (for floats in 0..1 pass (a * 255).round().astype(np.uint8))" if a.dtype.kind == "f" else ""
        raise ImageError(f"cannot use a numpy array of dtype {a.dtype} (shape {shape}) as an image: "
                         f"expected {ARRAY_FORMS}{hint}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)):
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ImageError(f"cannot use image array of shape {shape}: it has zero size")
        return Image.fromarray(np.array(a, order="C", copy=True))  # mode L, RGB or RGBA
    if a.ndim == 4:
        hint = "; for several images pass a list of [H, W, C] arrays"
    elif a.ndim == 3 and a.shape[0] in (1, 3, 4):
        hint = "; for a channels-first [C, H, W] array pass a.transpose(1, 2, 0)"
    else:
        hint = ""
    raise ImageError(f"cannot use a numpy array of shape {shape} as an image: expected {ARRAY_FORMS}{hint}")


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"array {'x'.join(str(d) for d in x.shape)} {x.dtype}"
    if isinstance(x, (bytes, bytearray, memoryview)):
        return f"from {len(x)} bytes"
    if isinstance(x, Image.Image):
        return f"{x.mode} {x.size[0]}x{x.size[1]}"
    return repr(os.fspath(x))


def _check_size(img: Image.Image, what: str, max_pixels: int | None) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"cannot use image {what}: it has zero size ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"image {what} is too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            f"(possible decompression bomb; raise max_pixels to allow it)"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way the reference does: ``img.convert("RGB")``.

    Alpha is dropped, not composited (RGBA, LA, PA: the colour channels are kept as they are).

    Deliberate choice where the reference is broken: 16-bit images (modes I;16, I;16L, I;16B, I;16N)
    and 32-bit integer images (mode I, which is how 16-bit PNG/TIFF samples often arrive) are scaled
    to 8 bits with ``value >> 8`` (mode I is clipped to 0..65535 first). Pillow's own convert("RGB")
    clips these to 255, which turns almost every 16-bit photo into a white image.
    """
    if img.mode == "RGB":
        return img.copy()  # never hand the caller's object on (we may transpose/resize it later)
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        a = np.asarray(img)  # [H, W] uint16 (either endianness) or int32
        if img.mode == "I":
            a = np.clip(a, 0, 65535)
        a8 = (a.astype(np.uint32) >> 8).astype(np.uint8)  # [H, W]
        img = Image.fromarray(a8)  # mode L
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert image of mode {img.mode!r} to RGB: {e}") from None


def load_image(x: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load a PIL image, a file path, encoded bytes or a uint8 numpy array into an RGB PIL image.

    Raises ValueError for unreadable data or paths, zero-size images, images above ``max_pixels``
    (checked from the header before decoding) and modes that cannot become RGB.
    Note: Pillow refuses files above 2 * Image.MAX_IMAGE_PIXELS (about 179 MP) on its own; a
    ``max_pixels`` above that also needs Image.MAX_IMAGE_PIXELS raised.
    EXIF orientation is not applied (the reference does not apply it either).
    """
    if isinstance(x, np.ndarray):
        x = array_to_image(x)
    if isinstance(x, Image.Image):
        what = _describe(x)
        _check_size(x, what, max_pixels)
        try:
            return to_rgb(x)  # may decode a lazily opened image
        except ImageError:
            raise
        except Exception as e:
            raise ImageError(f"cannot read image {what}: {type(e).__name__}: {e}") from None
    if isinstance(x, (bytes, bytearray, memoryview)):
        what = _describe(x)
        src = io.BytesIO(bytes(x))
    elif isinstance(x, (str, os.PathLike)):
        what = _describe(x)
        src = os.fspath(x)
        if not os.path.isfile(src):
            raise ImageError(f"cannot read image {what}: no such file")
    else:
        raise ImageError(
            f"cannot read image of type {type(x).__name__}: expected a PIL image, a file path, bytes or {ARRAY_FORMS}"
        )
    try:
        with Image.open(src) as img:
            _check_size(img, what, max_pixels)  # header only: nothing is decoded yet
            img.load()
            return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {what} is too large (possible decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {what}: not a recognised image format") from None
    except Exception as e:  # Pillow plugins raise OSError, ValueError, SyntaxError, EOFError, ... on corrupt data
        raise ImageError(f"cannot read image {what}: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------- HD transform


def hd_resize_size(width: int, height: int, num_crops: int) -> tuple[int, int, bool]:
    """Size of the bilinear resize of the HD transform: (new_w, new_h, transposed).

    The sizes are in the landscape frame (after the transpose of a portrait image).
    """
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    # Deliberate: the reference computes 0 here for extreme aspect ratios and then fails inside the
    # resize; we keep at least one row so such images still work.
    new_h = max(1, int(new_w / ratio))
    return new_w, new_h, transposed


def hd_image_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(height, width) of the padded HD image, in the original orientation: the image_sizes entry."""
    new_w, new_h, transposed = hd_resize_size(width, height, num_crops)
    pad_h = math.ceil(new_h / CROP) * CROP
    return (new_w, pad_h) if transposed else (pad_h, new_w)


def num_image_tokens_for(width: int, height: int, num_crops: int = DEFAULT_NUM_CROPS) -> int:
    """Placeholder tokens for an image of the given original size, without touching any pixels."""
    return num_image_tokens(*image_grid(hd_image_size(width, height, check_num_crops(num_crops))))


def hd_transform(img: Image.Image, num_crops: int) -> np.ndarray:
    """HD transform of an RGB PIL image -> uint8 array [H, W, 3], H and W multiples of 336.

    Portrait images are transposed to landscape, resized with PIL bilinear to width s*336
    (s the largest integer with s * ceil(s / ratio) <= num_crops), padded in height with white
    (centered, the extra row at the bottom) to a multiple of 336, and transposed back.
    """
    width, height = img.size
    new_w, new_h, transposed = hd_resize_size(width, height, num_crops)
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    a = np.asarray(img)  # [new_h, new_w, 3] uint8
    tar = math.ceil(new_h / CROP) * CROP
    top = int((tar - new_h) / 2)
    out = np.full((tar, new_w, 3), 255, dtype=np.uint8)  # [tar, new_w, 3] white
    out[top : top + new_h] = a
    if transposed:
        out = out.transpose(1, 0, 2)  # same as PIL's Image.TRANSPOSE on the padded image
    return np.ascontiguousarray(out)


@lru_cache(maxsize=8)
def _normalize_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: the normalised value of every 8-bit level per channel, computed with the
    same float32 operations as ToTensor + Normalize ((v / 255 - mean) / std)."""
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)  # [256]
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    lut = ((v[None, :] - m) / s).astype(np.float32)  # [3, 256]
    lut.setflags(write=False)
    return lut


def normalize(a: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]: x / 255, then (x - mean) / std per channel (a lookup table)."""
    lut = _normalize_lut(tuple(float(v) for v in mean), tuple(float(v) for v in std))  # [3, 256]
    a3 = np.ascontiguousarray(a.transpose(2, 0, 1))  # [3, H, W] uint8
    out = np.empty(a3.shape, dtype=np.float32)  # [3, H, W]
    for c in range(3):
        out[c] = lut[c][a3[c]]
    return out


# ------------------------------------------------------------------------------------ bicubic resize

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic weights for the 4 taps at offsets -1, 0, 1, 2 given fraction t: [n] -> [n, 4]."""
    A = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


@lru_cache(maxsize=64)
def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps and weights reproducing torch bicubic interpolation along one axis:
    (taps [out_size, 4] int64 input indices, weights [out_size, 4] float32).

    Matches F.interpolate(mode='bicubic', align_corners=False, antialias=False) with an explicit size:
    source x = (i + 0.5) * in/out - 0.5, taps floor(x)-1..floor(x)+2 clamped to the border, Keys
    cubic with A = -0.75. Without antialias there are 4 taps even when downsampling.
    """
    # Computed in float32 like PyTorch's CPU kernel (float32 scale and fraction): with float64 the
    # weights drift by up to ~1e-3 for non-integer scales. For our inputs (H, W multiples of 336)
    # the scale is an integer and both agree exactly.
    f32 = np.float32
    scale = f32(in_size / out_size)
    src = (float(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(f32)  # [out] source coordinate
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # [out]
    t = np.clip(src - idx.astype(f32), f32(0.0), f32(1.0))  # [out] float32 fraction
    w = _cubic_weights(t).astype(f32)  # [out, 4]
    taps = np.clip(idx[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)  # [out, 4]
    taps.setflags(write=False)
    w.setflags(write=False)
    return taps, w


def resize_bicubic(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float32 [C, H, W] -> [C, out_h, out_w], torch-compatible bicubic, separable.

    Equivalent to ``A @ x @ B.T`` with the dense interpolation matrices A [out_h, H], B [out_w, W], but
    applied as 4-tap gathers (the matrices have 4 non-zeros per row), which is ~50x less work than dense
    matmuls on a large HD image.
    """
    _, h, w = x.shape
    th, wh = bicubic_taps(h, out_h)  # [out_h, 4] each
    tw, ww = bicubic_taps(w, out_w)  # [out_w, 4] each
    y = x[:, th[:, 0], :] * wh[None, :, 0, None]  # [C, out_h, W]
    for j in range(1, 4):
        y += x[:, th[:, j], :] * wh[None, :, j, None]
    z = y[:, :, tw[:, 0]] * ww[None, None, :, 0]  # [C, out_h, out_w]
    for j in range(1, 4):
        z += y[:, :, tw[:, j]] * ww[None, None, :, j]
    return z


# ---------------------------------------------------------------------------------------- crops


def to_tiles(x: np.ndarray) -> np.ndarray:
    """float32 [3, H, W] (multiples of 336) -> [H/336 * W/336, 3, 336, 336], tiles row-major."""
    c, h, w = x.shape
    rows, cols = h // CROP, w // CROP
    t = x.reshape(c, rows, CROP, cols, CROP).transpose(1, 3, 0, 2, 4)  # [rows, cols, 3, 336, 336]
    return t.reshape(rows * cols, c, CROP, CROP)


def image_crops(
    img: Image.Image,
    num_crops: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, tuple[int, int], int]:
    """One RGB image -> (crops [num_crops+1, 3, 336, 336] float32, (H, W) padded size, num tokens).

    Crop 0 is the global view (the whole normalised padded image resized bicubic to 336x336), then
    the H/336 * W/336 tiles row-major, then zero crops up to num_crops + 1.
    """
    hd = normalize(hd_transform(img, num_crops), mean, std)  # [3, H, W]
    _, h, w = hd.shape
    n_tiles = (h // CROP) * (w // CROP)
    assert n_tiles <= num_crops, (n_tiles, num_crops)
    out = np.zeros((num_crops + 1, 3, CROP, CROP), dtype=np.float32)  # [num_crops+1, 3, 336, 336]
    out[0] = resize_bicubic(hd, CROP, CROP)
    out[1 : 1 + n_tiles] = to_tiles(hd)
    return out, (h, w), num_image_tokens(*image_grid((h, w)))


def preprocess_images(
    images: Sequence[ImageInput],
    num_crops: int = DEFAULT_NUM_CROPS,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Images -> (pixel_values [N, num_crops+1, 3, 336, 336] float32, image_sizes [N, 2] int64 (H, W),
    num_img_tokens list[int])."""
    num_crops = check_num_crops(num_crops)
    rgb = [load_image(im, max_pixels) for im in images]  # load all first: fail before heavy work
    pixel_values = np.zeros((len(rgb), num_crops + 1, 3, CROP, CROP), dtype=np.float32)
    image_sizes = np.zeros((len(rgb), 2), dtype=np.int64)
    tokens = []
    for i, im in enumerate(rgb):
        pixel_values[i], (h, w), n = image_crops(im, num_crops, mean, std)
        image_sizes[i] = (h, w)
        tokens.append(n)
    return pixel_values, image_sizes, tokens
