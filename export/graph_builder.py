"""Build an ONNX graph by hand, streaming initializers to ONE external data file as they are created.

    gb = GraphBuilder("out/decoder.onnx", io_dtype="float16")   # opens out/decoder.onnx.data now
    x = gb.input("x", gb.float_type, [1, "S", 3072])
    h = gb.linear(x, "layers.0.mlp.down", w_np, precision="int4", block_size=32)   # MatMulNBits
    y = gb.node("Sigmoid", [h])                                                     # -> auto-named output
    gb.output(y, gb.float_type, [1, "S", 3072])   # or gb.output(y, ..., name="logits") to rename
    gb.save()                                                                        # writes out/decoder.onnx

Every initializer above `inline_threshold` bytes is appended to `<model>.data` at once (64-byte aligned,
tensors of 1 MiB or more 64 KiB aligned so ONNX Runtime can memory-map them) and kept in the model only
as a TensorProto with data_location EXTERNAL (location = the data file's base name, offset, length).
So the peak memory of an export is about one layer's tensors, whatever the model size. The .onnx and
.onnx.data files must stay side by side (the location is relative).

Opset: ai.onnx 21 (ORT 1.31 supports it) + com.microsoft 1 (contrib ops: MatMulNBits,
GroupQueryAttention, SkipSimplifiedLayerNormalization, MultiHeadAttention, QuickGelu, ...). IR version 10.

MatMulNBits `accuracy_level` (the minimum accuracy of the activations inside the CPU kernel; CUDA
ignores it): 0 (unset) and 1 (fp32) compute exactly x @ dequantize(W).T (relative error ~1e-7 measured on
ORT 1.31 CPU); 4 (int8) quantizes the activations blockwise to int8 on CPU: much faster on CPU but
~5e-3 relative error per matmul. The default here is 0 (exact: the parity tests depend on it); pass
accuracy_level=4 for a CPU-speed bundle.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .options import IO_DTYPES, PRECISIONS, check_choice
from .quantize import QuantizedWeight, quantize

OPSET = 21
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10
_ALIGN = 64
_BIG = 1 << 20  # tensors of at least this many bytes ...
_BIG_ALIGN = 1 << 16  # ... start at a 64 KiB boundary (mmap allocation granularity, as onnx's own saver)

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL,
}


def onnx_dtype(dtype) -> int:
    """numpy dtype (or 'float32' / 'float16' ...) -> TensorProto element type."""
    try:
        return _NP_TO_ONNX[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no ONNX tensor type here") from None


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor; bf16 must be converted by the caller (numpy has no bf16)
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(a)


class GraphBuilder:
    """One ONNX graph under construction; initializers go straight to `<path>.data`."""

    def __init__(self, path: str | Path, name: str = "graph", io_dtype: str = "float32",
                 inline_threshold: int = 1024, accuracy_level: int = 0):
        self.path = Path(path)
        self.data_path = self.path.with_name(self.path.name + ".data")
        self.name = name
        check_choice(io_dtype, IO_DTYPES, "io_dtype", ValueError)
        self.io_dtype = io_dtype
        self.np_float = np.dtype(io_dtype)
        self.float_type = onnx_dtype(io_dtype)  # TensorProto element type of the activations
        self.inline_threshold = inline_threshold
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()  # every name reserved (values, initializers, node names)
        self._values: set[str] = set()  # value names defined so far (inputs, initializers, node outputs)
        self._counter: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = open(self.data_path, "wb")
        self._offset = 0
        self.external_bytes = 0

    # ---- names -----------------------------------------------------------------------------------
    def unique(self, prefix: str) -> str:
        """A name not used yet in this graph: prefix, prefix_1, prefix_2, ..."""
        n = self._counter.get(prefix, 0)
        name = prefix if n == 0 and prefix not in self._names else None
        while name is None or name in self._names:
            n += 1
            name = f"{prefix}_{n}"
        self._counter[prefix] = n
        self._names.add(name)
        return name

    # ---- graph I/O ---------------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        if name in self._names:
            raise ValueError(f"graph input name {name!r} is already used")
        self._names.add(name)
        self._values.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, elem_type: int, shape: Sequence[int | str | None] | None, name: str | None = None) -> str:
        """Mark `value` as a graph output (renamed to `name` through an Identity if given and different)."""
        if name is not None and name != value:
            if name in self._names:
                raise ValueError(f"graph output name {name!r} is already used")
            self._names.add(name)
            self._values.add(name)
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self.unique(f"{name}/Identity")))
            value = name
        self.outputs.append(helper.make_tensor_value_info(value, elem_type, None if shape is None else list(shape)))
        return value

    # ---- initializers ------------------------------------------------------------------------------
    def initializer(self, name: str, array, unique: bool = False) -> str:
        """Add a constant tensor; big ones are written to the data file now (the array can be freed after)."""
        a = _as_numpy(array)
        elem = onnx_dtype(a.dtype)
        name = self.unique(name) if unique else name
        if not unique:
            if name in self._names:
                raise ValueError(f"initializer name {name!r} is already used")
            self._names.add(name)
        self._values.add(name)
        if a.nbytes <= self.inline_threshold:
            t = helper.make_tensor(name, elem, a.shape, a.tobytes(), raw=True)
        else:
            align = _BIG_ALIGN if a.nbytes >= _BIG else _ALIGN
            pad = (-self._offset) % align
            if pad:
                self._data.write(b"\0" * pad)
                self._offset += pad
            t = TensorProto(name=name, data_type=elem, dims=list(a.shape), data_location=TensorProto.EXTERNAL)
            for k, v in (("location", self.data_path.name), ("offset", str(self._offset)), ("length", str(a.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self._data.write(a.tobytes(order="C"))
            self._offset += a.nbytes
            self.external_bytes += a.nbytes
        self.initializers.append(t)
        return name

    def const(self, value, dtype=None, name: str = "const") -> str:
        """A small constant (deduplicated): a Python scalar/list or numpy array."""
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if a.nbytes <= 256 and key in self._consts:
            return self._consts[key]
        n = self.initializer(name, a, unique=True)
        if a.nbytes <= 256:
            self._consts[key] = n
        return n

    # ---- nodes -------------------------------------------------------------------------------------
    def node(self, op_type: str, inputs: Iterable[str | None], outputs: int | Sequence[str] = 1,
             name: str | None = None, domain: str = "", **attrs):
        """Append a node. `outputs` is a count (auto-named) or a list of names; returns one name or a list.
        An input of None or "" is an omitted optional input."""
        name = self.unique(name or op_type)
        if isinstance(outputs, int):
            outs = [self.unique(f"{name}/out{i}" if outputs > 1 else f"{name}/out") for i in range(outputs)]
            single = outputs == 1
        else:
            outs = list(outputs)
            for o in outs:
                if o:  # a name from unique() is fine; one already produced or fed is not
                    if o in self._values:
                        raise ValueError(f"value name {o!r} is already defined in this graph")
                    self._names.add(o)
            single = False
        self._values.update(o for o in outs if o)
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, ins, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if single else outs

    def ms(self, op_type: str, inputs, outputs=1, name=None, **attrs):
        """A com.microsoft contrib node."""
        return self.node(op_type, inputs, outputs, name=name, domain=MS_DOMAIN, **attrs)

    # ---- linear layers -----------------------------------------------------------------------------
    def linear(self, x: str, name: str, weight, bias=None, precision: str = "fp32", block_size: int = 32,
               symmetric: bool = True, accuracy_level: int | None = None) -> str:
        """y = x @ weight.T (+ bias), weight [N, K] in nn.Linear layout (numpy or torch, any float dtype).

        precision fp32 / fp16: MatMul with the weight stored transposed [K, N] in that float type (a Cast to
        the activation type is inserted if it differs, e.g. an fp16 lm_head in an fp32 graph);
        int8 / int4: one com.microsoft.MatMulNBits (see export/quantize.py), scales in the activation dtype.
        The bias (if any) is an Add, in the activation dtype."""
        check_choice(precision, PRECISIONS, f"{name}: precision", ValueError)
        w = weight
        if hasattr(w, "detach"):
            import torch

            w = w.detach().cpu().to(torch.float32).numpy()
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"{name}: linear weight must be 2-D [N, K], got shape {w.shape}")
        if precision in ("fp32", "fp16"):
            wdt = np.float32 if precision == "fp32" else np.float16
            wt = self.initializer(f"{name}.weight", np.ascontiguousarray(w.T.astype(wdt)))
            if np.dtype(wdt) != self.np_float:
                wt = self.node("Cast", [wt], name=f"{name}/CastW", to=self.float_type)
            y = self.node("MatMul", [x, wt], name=f"{name}/MatMul")
        else:
            q = quantize(w, 4 if precision == "int4" else 8, block_size, symmetric, scale_dtype=self.np_float)
            y = self.matmul_nbits(x, name, q, accuracy_level)
        if bias is not None:
            b = _as_numpy(bias.float() if hasattr(bias, "float") else bias).astype(self.np_float)
            y = self.node("Add", [y, self.initializer(f"{name}.bias", b)], name=f"{name}/Add")
        return y

    def matmul_nbits(self, x: str, name: str, q: QuantizedWeight, accuracy_level: int | None = None) -> str:
        """One MatMulNBits node for an already quantized weight (scales cast to the activation dtype)."""
        ins = [x, self.initializer(f"{name}.weight_q{q.bits}", q.packed),
               self.initializer(f"{name}.scales", q.scales.astype(self.np_float).reshape(-1))]
        if q.zero_points is not None:
            ins.append(self.initializer(f"{name}.zero_points", q.zero_points.reshape(-1)))
        acc = self.accuracy_level if accuracy_level is None else accuracy_level
        return self.ms("MatMulNBits", ins, name=f"{name}/MatMulNBits", K=q.K, N=q.N, bits=q.bits,
                       block_size=q.block_size, accuracy_level=acc)

    # ---- output ------------------------------------------------------------------------------------
    def make_model(self) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="phi3v-edge")
        m.ir_version = IR_VERSION
        return m

    def save(self, path: str | Path | None = None) -> Path:
        """Close the data file and write the .onnx next to it. Returns the .onnx path."""
        path = Path(path) if path is not None else self.path
        if path.parent.resolve() != self.data_path.parent.resolve():
            raise ValueError(f"{path} must be in the same directory as its data file {self.data_path}")
        self.close()
        if self.external_bytes == 0 and self.data_path.exists():
            self.data_path.unlink()  # nothing external: a single self-contained .onnx
        m = self.make_model()
        with open(path, "wb") as f:
            f.write(m.SerializeToString())
        return path

    def close(self) -> None:
        if not self._data.closed:
            self._data.flush()
            os.fsync(self._data.fileno())
            self._data.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
