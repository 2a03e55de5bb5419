"""export/quantize.py: MatMulNBits packing, checked against ONNX Runtime itself (its quantizer and its kernel)."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from phi3v_edge.export.quantize import QuantizedWeight, dequantize, quantize

CASES = [  # (N, K, block_size)
    (37, 64, 32), (5, 256, 128), (300, 384, 64), (50, 96, 32), (7, 48, 16), (129, 384, 128), (3, 192, 64),
]


def _weight(n, k, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    w[0, :16] = 0.0  # an all-zero block (scale 0)
    if n > 1:
        w[1, :16] = np.abs(w[1, :16])  # an all-positive block (asym zero point 0)
    return w


def _run_matmulnbits(q: QuantizedWeight, x: np.ndarray, accuracy_level: int = 0, dtype=np.float32) -> np.ndarray:
    tdt = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales.astype(dtype).reshape(-1), "S")]
    ins = ["A", "B", "S"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points.reshape(-1), "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=q.K, N=q.N, bits=q.bits,
                            block_size=q.block_size, accuracy_level=accuracy_level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", tdt, ["M", q.K])],
                          [helper.make_tensor_value_info("Y", tdt, ["M", q.N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"A": x.astype(dtype)})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n,k,bs", CASES)
def test_ort_kernel_equals_dequantized_matmul(n, k, bs, bits, symmetric):
    w = _weight(n, k, seed=n * k + bits)
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    q = quantize(w, bits, bs, symmetric)
    assert q.packed.shape == (n, k // bs, bs * bits // 8) and q.packed.dtype == np.uint8
    assert q.scales.shape == (n, k // bs) and q.scales.dtype == np.float32
    if symmetric:
        assert q.zero_points is None
    else:
        assert q.zero_points.shape == (n, (k // bs * bits + 7) // 8)
    ref = x.astype(np.float64) @ dequantize(q).T.astype(np.float64)
    y = _run_matmulnbits(q, x)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-6
    # and the quantization is sane: within one step of each block (half a step, plus the clipped far end
    # of a symmetric block: +8 steps does not exist; or the rounded asymmetric zero point)
    err = np.abs(dequantize(q) - w).reshape(n, k // bs, bs)
    step = np.abs(q.scales)[..., None]
    assert (err <= step * 1.0001 + 1e-6).all()
    assert np.median(err / np.maximum(step, 1e-12)) < 0.3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_bit_exact_with_ort_quantizer(bits, symmetric):
    """Same codes, scales and zero points as ONNX Runtime's MatMulNBitsQuantizer (its C++ kernels)."""
    from onnxruntime.capi import _pybind_state as C

    fn = C.quantize_matmul_4bits if bits == 4 else C.quantize_matmul_8bits
    for j, (n, k, bs) in enumerate(CASES):
        w = _weight(n, k, seed=7 * n + k)
        if j % 2:
            w = np.round(w * 4) / 4  # many exact .5 ties in code space: rounding must be C roundf's
        kb, kpack = k // bs, 8 // bits
        packed = np.zeros((n, kb, bs // kpack), np.uint8)
        zp = np.zeros((n, (kb + kpack - 1) // kpack), np.uint8)
        sc = np.zeros((n, kb), np.float32)
        fn(packed, np.ascontiguousarray(w.T), sc, zp, bs, n, k, symmetric)
        q = quantize(w, bits, bs, symmetric)
        np.testing.assert_array_equal(q.packed, packed)
        np.testing.assert_array_equal(q.scales, sc)
        if not symmetric:
            np.testing.assert_array_equal(q.zero_points, zp)


def test_fp16_scales_dequantize_exactly():
    w = _weight(40, 128, seed=3)
    q = quantize(w, 4, 32, True, scale_dtype=np.float16)
    assert q.scales.dtype == np.float16
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    ref = x @ dequantize(q).T
    y = _run_matmulnbits(q, x, dtype=np.float16).astype(np.float32)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-3  # fp16 activations and output


def test_layout_low_nibble_first():
    w = np.zeros((1, 32), np.float32)
    w[0, 0], w[0, 1], w[0, 31] = -8.0, 1.0, 7.0  # symmetric scale = -8 / -8 = 1 -> codes = w + 8
    q = quantize(w, 4, 32, True)
    assert q.scales[0, 0] == 1.0
    assert q.packed[0, 0, 0] == (0 | (9 << 4))  # element 0 low nibble, element 1 high nibble
    assert q.packed[0, 0, 15] == (8 | (15 << 4))
    np.testing.assert_array_equal(dequantize(q), w)


def test_accepts_torch_bf16():
    import torch

    w = torch.randn(8, 64).to(torch.bfloat16)
    q = quantize(w, 8, 32)
    assert np.abs(dequantize(q) - w.float().numpy()).max() < 0.05


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=4, block_size=48), "block size 48"),
    (dict(bits=3, block_size=32), "3-bit"),
    (dict(bits=4, block_size=128), "not divisible by the block size 128"),
])
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(np.zeros((4, 96), np.float32), **kwargs)


def test_bad_shape_and_values():
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros((4, 4, 32), np.float32))
    w = np.zeros((2, 32), np.float32)
    w[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize(w)
