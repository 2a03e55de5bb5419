"""Micro-benchmark of one linear on ONNX Runtime's CPU provider: fp32 MatMul vs MatMulNBits (8-bit and 4-bit,
block 32, symmetric) at accuracy_level 0 and 4, interleaved repetitions, medians, and each output's error
against fp32. Which kernels MLAS has depends on the CPU's vector features (AVX2 / AVX-512 / VNNI).

    python -m phi3v_edge.benchmarks.matmul_nbits_cpu M K N REPS
    e.g. 1154 1024 4096 5   (a CLIP linear over 2 crops x 577 tokens: the vision encoder at num_crops 1)
         1 3072 8192 20     (a decode step's gate_up-sized linear)
"""
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from phi3v_edge.export.quantize import quantize

M, K, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
W = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
x = rng.standard_normal((1, M, K)).astype(np.float32)

def model(kind):
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, M, K])
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, M, N])
    if kind == "fp32":
        inits = [numpy_helper.from_array(W.T.copy(), "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        bits, acc = (8 if kind.startswith("int8") else 4), int(kind[-1])
        q = quantize(W, bits, 32, True, scale_dtype=np.float32)
        inits = [numpy_helper.from_array(q.packed, "w"), numpy_helper.from_array(q.scales.reshape(-1), "s")]
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                                block_size=32, accuracy_level=acc)
    g = helper.make_graph([node], "g", [X], [Y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

kinds = ["fp32", "int8-acc0", "int8-acc4", "int4-acc0", "int4-acc4"]
sess = {k: model(k) for k in kinds}
ref = sess["fp32"].run(None, {"x": x})[0]
times = {k: [] for k in kinds}
for r in range(int(sys.argv[4])):
    for k in kinds:
        t = time.perf_counter()
        y = sess[k].run(None, {"x": x})[0]
        times[k].append(time.perf_counter() - t)
for k in kinds:
    y = sess[k].run(None, {"x": x})[0]
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    print(f"M={M} K={K} N={N} {k:10s} median {1e3*statistics.median(times[k]):8.2f} ms  rel err vs fp32 {err:.2e}")
