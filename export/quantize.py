"""Blockwise weight quantization in ONNX Runtime's `com.microsoft.MatMulNBits` layout. Vectorized numpy.

A linear weight W [N, K] (PyTorch's nn.Linear layout: out_features x in_features) is cut along K into
blocks of `block_size`; every block of every row gets one scale (and, when asymmetric, one zero point):

    packed       uint8 [N, n_blocks, blob_size]   blob_size = block_size * bits / 8. K-major blocks of row n;
                                                  4-bit: element 2j of a block in the LOW nibble of byte j,
                                                  element 2j+1 in the high nibble. 8-bit: one byte per element.
    scales       float [N, n_blocks]              in the activation dtype (float32 or float16); the graph
                                                  stores them flat [N * n_blocks]
    zero_points  uint8 [N, ceil(n_blocks*bits/8)] asymmetric only: 4-bit two per byte (low nibble first),
                                                  each row padded to whole bytes (pad nibble 8, as ORT); None when symmetric, in
                                                  which case ORT uses the implicit zero point 2^(bits-1)
                                                  (8 for 4-bit, 128 for 8-bit)

    W_eff[n, k] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size]   (what ORT computes)

Rounding rules are those of ONNX Runtime's own quantizer (`MatMulNBitsQuantizer`, i.e. the C++ kernels
`quantize_matmul_4bits` / `quantize_matmul_8bits` in MLAS), which the tests check bit for bit:

  * symmetric: m = the block's value of largest magnitude, WITH its sign (on a tie, the negative one);
    scale = m / -2^(bits-1). So m itself maps exactly to code 0 (= -8 for 4-bit) and the block uses
    the full [-8, 7] range (the scale may be negative; that is fine, ORT only multiplies by it).
    This is more accurate than absmax / 7, which wastes code -8.
  * asymmetric: lo = min(block min, 0), hi = max(block max, 0), scale = (hi - lo) / (2^bits - 1),
    zp = clamp(round(-lo / scale), 0, 2^bits - 1).
  * codes: q = clamp(roundf(w * (1 / scale) + zp), 0, 2^bits - 1) in float32, roundf = half away from zero;
    a zero scale gives 1/scale = 0 (an all-zero block).

When the scales are stored in float16 they are rounded to float16 FIRST and the codes computed with the
rounded scale, so dequantize() is exactly the weight ORT sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .options import BLOCK_SIZES as SUPPORTED_BLOCK_SIZES  # noqa: F401  (one home: export/options.py)
from .options import check_block_size

SUPPORTED_BITS = (4, 8)
_ROW_CHUNK = 2048  # rows quantized at a time: bounds the temporaries for big matrices (lm_head)


@dataclass
class QuantizedWeight:
    packed: np.ndarray  # uint8 [N, n_blocks, blob_size]
    scales: np.ndarray  # float32 or float16 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)], None when symmetric
    bits: int
    block_size: int
    K: int
    N: int

    @property
    def n_blocks(self) -> int:
        return self.K // self.block_size

    @property
    def blob_size(self) -> int:
        return self.block_size * self.bits // 8

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def check_params(K: int, bits: int, block_size: int, name: str = "weight") -> None:
    """Raise a clear ValueError for an unsupported bits / block size, or K not divisible by the block size."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: {bits}-bit quantization is not supported (use 4 or 8)")
    check_block_size(block_size, {"K": K}, what=f"{name}: ", error=ValueError)


def _to_numpy_f32(w) -> np.ndarray:
    if hasattr(w, "detach"):  # torch tensor (bf16 has no numpy dtype: go through float32)
        import torch

        w = w.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(w, dtype=np.float32)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact: x - trunc(x) is exact in float32."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= np.float32(0.5), np.sign(x), np.float32(0)).astype(x.dtype)


def _quantize_rows(w: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype):
    n, k = w.shape
    qmax = (1 << bits) - 1
    blocks = w.reshape(n, k // block_size, block_size)
    mn = blocks.min(axis=-1)
    mx = blocks.max(axis=-1)
    if symmetric:
        m = np.where(np.abs(mx) > np.abs(mn), mx, mn)
        scale = (m / np.float32(-(1 << (bits - 1)))).astype(np.float32)
        zp = np.full(scale.shape, 1 << (bits - 1), dtype=np.float32)
    else:
        lo = np.minimum(mn, np.float32(0))
        hi = np.maximum(mx, np.float32(0))
        scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp_fp = np.where(scale != 0, np.float32(0) - lo / scale, lo)
        zp = np.clip(_round_half_away(zp_fp), 0, qmax).astype(np.float32)
    scale = scale.astype(scale_dtype)
    s32 = scale.astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = np.where(s32 != 0, np.float32(1) / s32, np.float32(0)).astype(np.float32)
    # ORT rounds (w * recip + zp), the sum taken in float32, half away from zero, then clamps to [0, qmax].
    # Since a negative sum clamps to 0 either way, floor(x) + (frac(x) >= 0.5) gives the same codes (in place: fast)
    x = blocks * recip[..., None]
    x += zp[..., None]
    f = np.floor(x)
    x -= f
    f += x >= np.float32(0.5)
    q = np.clip(f, 0, qmax, out=f).astype(np.uint8)
    return q, scale, zp.astype(np.uint8)


def _pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """q uint8 [..., L] codes -> [..., L * bits / 8] bytes, low nibble first for 4-bit."""
    if bits == 8:
        return q
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack_codes(p: np.ndarray, bits: int, length: int) -> np.ndarray:
    if bits == 8:
        return p[..., :length]
    out = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(*p.shape[:-1], -1)
    return out[..., :length]


def quantize(w, bits: int = 4, block_size: int = 32, symmetric: bool = True,
             scale_dtype=np.float32) -> QuantizedWeight:
    """w [N, K] float (numpy or torch, any float dtype) -> QuantizedWeight in MatMulNBits layout.

    scale_dtype: the activation dtype of the graph (np.float32 or np.float16)."""
    w = _to_numpy_f32(w)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D weight [N, K], got shape {w.shape}")
    n, k = w.shape
    check_params(k, bits, block_size)
    scale_dtype = np.dtype(scale_dtype)
    if scale_dtype not in (np.float32, np.float16):
        raise ValueError(f"scale dtype {scale_dtype} is not supported (float32 or float16)")
    if not np.isfinite(w).all():
        raise ValueError("quantize: the weight holds NaN or infinite values")
    nb = k // block_size
    packed = np.empty((n, nb, block_size * bits // 8), np.uint8)
    scales = np.empty((n, nb), scale_dtype)
    zps = None if symmetric else np.zeros((n, (nb * bits + 7) // 8), np.uint8)
    for r0 in range(0, n, _ROW_CHUNK):
        r1 = min(n, r0 + _ROW_CHUNK)
        q, s, zp = _quantize_rows(w[r0:r1], bits, block_size, symmetric, scale_dtype)
        packed[r0:r1] = _pack_codes(q, bits)
        scales[r0:r1] = s
        if zps is not None:
            if bits == 4 and nb % 2:
                zp = np.concatenate([zp, np.full((r1 - r0, 1), 8, np.uint8)], axis=1)  # pad each row to whole bytes (ORT pads with 8)
            zps[r0:r1] = _pack_codes(zp, bits)
    return QuantizedWeight(packed, scales, zps, bits, block_size, k, n)


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """-> [N, K] float32: the effective weight ORT's MatMulNBits multiplies by ((code - zp) * scale)."""
    codes = _unpack_codes(q.packed, q.bits, q.block_size).astype(np.float32)  # [N, nb, bs]
    if q.zero_points is None:
        zp = np.float32(1 << (q.bits - 1))
    else:
        zp = _unpack_codes(q.zero_points, q.bits, q.n_blocks).astype(np.float32)[..., None]
    w = (codes - zp) * q.scales.astype(np.float32)[..., None]
    return w.reshape(q.N, q.K)
