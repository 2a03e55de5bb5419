"""The decoder's machinery: `prefill` of one request into its KV slot, and `step`, ONE batched decode step over
the first b slots (a batch bucket), on IOBinding with buffers allocated once.

Buffers (allocated once per engine, on the session's device; N = max_batch, M = max_length):
    kv cache        [N, kv_heads, M, head_dim] x 2 x layers   runtime/kv_cache.py; past and present share it
    step_ids        int64 [N, 1]      each row's input token of a decode step
    step_pos        int64 [N, 1]      each row's position_ids (its position, + M under the long LongRoPE factors)
    seqlens_k       int32 [N]         each row's total length after the step - 1
    total_len       int32 []          host (GroupQueryAttention reads it on the CPU): the largest total length
                                      of the rows; M for decode steps under CUDA graphs (a replayed graph keeps
                                      the captured host value, so it is fixed at the capacity and the rows'
                                      lengths come from the device-side seqlens_k, as onnxruntime-genai does;
                                      prefill, never captured, gets the real total)
    cos, sin        io    [2 M, head_dim/2]  the stacked [short; long] LongRoPE tables, written once
    logits          io    [N, 1, vocab]      each row's last-position logits
    no_features     io    [0, hidden]        image_features of a decode step (no image rows)

A decode step over bucket b writes the three small per-row host arrays into their fixed buffers and runs the
decoder on the bucket's IOBinding, bound once (views of rows 0..b-1 by address): no allocation, no rebinding,
fixed addresses, which is what CUDA graph capture/replay needs. On CUDA with `cuda_graph=True` each bucket has
its own graph (`gpu_graph_id` = bucket's index + 1): ONNX Runtime captures it on first use and replays it
afterwards. Prefill runs with id -1 (no graph): its shapes change with every prompt.
Rows of a bucket that no request owns are fed token 0 at their slot's current length (the write lands past
the slot's valid rows, so a cached prefix there stays intact).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import bundle as fmt
from .errors import BundleError
from .kv_cache import KVCache
from .rope import stacked_tables, table_rows
from .session import create_session, device_of, numpy_dtype, run_options


def batch_buckets(max_batch: int) -> list[int]:
    """Decode batch sizes with their own binding (and CUDA graph): powers of two below max_batch, and max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class _Buffer:
    """A small fixed device buffer with a host twin: on the CPU they share memory, on CUDA `push` copies."""

    def __init__(self, shape, dtype, device: str, device_id: int):
        self.host = np.zeros(shape, dtype)
        if device == "cpu":
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:
            self.value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.host.dtype, device, device_id)
        self.device, self.device_id, self.dtype = device, device_id, self.host.dtype
        self.ptr = self.value.data_ptr()
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.host.dtype.itemsize if len(shape) > 1 \
            else self.host.dtype.itemsize

    def push(self) -> None:
        if self.device != "cpu":
            self.value.update_inplace(self.host)

    def bind_input(self, b: ort.IOBinding, name: str, start: int, rows: int) -> None:
        b.bind_input(name, self.device, self.device_id, self.dtype, [rows, *self.host.shape[1:]],
                     self.ptr + start * self.row_bytes)

    def bind_output(self, b: ort.IOBinding, name: str, start: int, rows: int) -> None:
        b.bind_output(name, self.device, self.device_id, self.dtype, [rows, *self.host.shape[1:]],
                      self.ptr + start * self.row_bytes)

    def rows(self, start: int, rows: int) -> np.ndarray:
        """Host view (CPU) or copy (CUDA) of rows start..start+rows-1."""
        if self.device == "cpu":
            return self.host[start: start + rows]
        return self.value.numpy()[start: start + rows]


class Decoder:
    """decoder.onnx with its slotted KV cache and step buffers."""

    def __init__(self, path: str | Path, rope: dict, max_length: int, provider: str = "cpu", *, max_batch: int = 1,
                 device_id: int = 0, cuda_graph: bool = False, threads: int | None = None, all_logits: bool = False,
                 total_at_capacity: bool | None = None):
        self.provider, self.device, self.device_id = provider, device_of(provider), device_id
        self.cuda_graph = bool(cuda_graph)
        # decode steps feed total_sequence_length = max_length (what graph replay needs); None: with CUDA graphs
        self.total_at_capacity = self.cuda_graph if total_at_capacity is None else bool(total_at_capacity)
        self.session = create_session(path, provider, device_id=device_id, cuda_graph=cuda_graph, threads=threads,
                                      what=Path(path).name)
        self.rope = rope
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        self._check_io(ins, outs)
        self.num_layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
        kv = ins[fmt.past_names(0)[0]]
        _, self.kv_heads, graph_m, self.head_dim = kv.shape
        if not isinstance(self.kv_heads, int) or not isinstance(self.head_dim, int):
            raise BundleError(f"decoder.onnx: past_key_values.0.key has shape {kv.shape}; kv_heads and head_dim "
                              "must be fixed")
        if isinstance(graph_m, int) and graph_m != max_length:
            raise BundleError(f"decoder.onnx has KV buffers fixed at {graph_m} positions; max_length {max_length} "
                              f"must equal it")
        self.max_length, self.max_batch = int(max_length), int(max_batch)
        self.kv_dtype = numpy_dtype(kv.type)
        self.io_dtype = numpy_dtype(ins[fmt.IMAGE_FEATURES].type)
        self.hidden = ins[fmt.IMAGE_FEATURES].shape[1]
        self.rope_dtype = numpy_dtype(ins[fmt.COS_CACHE].type)
        lg = outs[fmt.LOGITS]
        self.logits_dtype = numpy_dtype(lg.type)
        self.vocab_size = lg.shape[-1]
        if not isinstance(self.vocab_size, int) or not isinstance(self.hidden, int):
            raise BundleError(f"decoder.onnx: logits {lg.shape} and image_features {ins[fmt.IMAGE_FEATURES].shape} "
                              "need a fixed last dimension")
        self.all_logits = bool(all_logits)

        dev, did, n = self.device, self.device_id, self.max_batch
        self.cache = KVCache(self.num_layers, self.kv_heads, self.head_dim, self.max_length, n, self.kv_dtype, dev, did)
        self.step_ids = _Buffer((n, 1), np.int64, dev, did)
        self.step_pos = _Buffer((n, 1), np.int64, dev, did)
        self.seqlens_k = _Buffer((n,), np.int32, dev, did)
        self.logits = _Buffer((n, 1, self.vocab_size), self.logits_dtype, dev, did)
        self.total_len = ort.OrtValue.ortvalue_from_numpy(np.zeros((), np.int32))  # host, as GQA wants it
        self._tot_host = np.zeros((), np.int32)
        cos, sin = stacked_tables(self.rope, self.head_dim, self.max_length, self.rope_dtype)
        self.cos = ort.OrtValue.ortvalue_from_numpy(cos, dev, did)
        self.sin = ort.OrtValue.ortvalue_from_numpy(sin, dev, did)
        self.no_features = ort.OrtValue.ortvalue_from_shape_and_type([0, self.hidden], self.io_dtype, dev, did)
        self.buckets = batch_buckets(n)
        self._steps: dict[int, tuple[ort.IOBinding, ort.RunOptions]] = {}
        self._prefill_ro = run_options(-1 if self.cuda_graph else None)
        self.head = LogitsHead(self, provider, device_id)

    # ---- set-up --------------------------------------------------------------------------------
    @staticmethod
    def _check_io(ins, outs) -> None:
        need_in = [fmt.INPUT_IDS, fmt.IMAGE_FEATURES, fmt.POSITION_IDS, fmt.SEQLENS_K, fmt.TOTAL_SEQ_LEN,
                   fmt.COS_CACHE, fmt.SIN_CACHE, *fmt.past_names(0)]
        missing = [n for n in need_in if n not in ins] + [n for n in (fmt.LOGITS, *fmt.present_names(0)) if n not in outs]
        if missing:
            raise BundleError(f"decoder.onnx lacks the inputs/outputs {missing} of the bundle contract "
                              "(see phi3v_edge.runtime.bundle; re-export the bundle with this version)")
        n = sum(1 for k in ins if k.startswith("past_key_values.") and k.endswith(".key"))
        for i in range(n):
            for name in (*fmt.past_names(i), *fmt.present_names(i)):
                if name not in ins and name not in outs:
                    raise BundleError(f"decoder.onnx lacks {name}")

    def _bind_tables(self, b: ort.IOBinding) -> None:
        b.bind_ortvalue_input(fmt.TOTAL_SEQ_LEN, self.total_len)
        b.bind_ortvalue_input(fmt.COS_CACHE, self.cos)
        b.bind_ortvalue_input(fmt.SIN_CACHE, self.sin)

    def _set_total(self, total: int, replayed: bool = False) -> None:
        """The host total_sequence_length: the real one, except for steps that replay a CUDA graph (the
        captured value is what the kernels see: the capacity, with the lengths from seqlens_k)."""
        self._tot_host[()] = self.max_length if (replayed and self.total_at_capacity) else total
        self.total_len.update_inplace(self._tot_host)

    def bucket_for(self, rows: int) -> int:
        """The smallest decode bucket holding `rows` leading slots."""
        for b in self.buckets:
            if b >= rows:
                return b
        raise ValueError(f"{rows} rows exceed max_batch {self.max_batch}")

    def _step_binding(self, b: int) -> tuple[ort.IOBinding, ort.RunOptions]:
        if b not in self._steps:
            bd = self.session.io_binding()
            self.cache.bind(bd, 0, b)
            self._bind_tables(bd)
            self.step_ids.bind_input(bd, fmt.INPUT_IDS, 0, b)
            self.step_pos.bind_input(bd, fmt.POSITION_IDS, 0, b)
            self.seqlens_k.bind_input(bd, fmt.SEQLENS_K, 0, b)
            bd.bind_ortvalue_input(fmt.IMAGE_FEATURES, self.no_features)
            self.logits.bind_output(bd, fmt.LOGITS, 0, b)
            graph_id = self.buckets.index(b) + 1 if self.cuda_graph else None
            self._steps[b] = (bd, run_options(graph_id))
        return self._steps[b]

    # ---- the two kinds of run ------------------------------------------------------------------
    def prefill(self, slot: int, ids: np.ndarray, features: np.ndarray | None, start: int, long: bool) -> None:
        """Write `ids` [S] (negative = image rows, filled in order from `features` [T, hidden]) into slot `slot`
        at positions start..start+S-1 (rows before `start` are the slot's kept prefix), with the short or
        long LongRoPE factors; leaves the last position's logits in row `slot` of `self.logits`."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        s = ids.shape[1]
        if s == 0:
            raise ValueError("prefill needs at least one token")
        if not 0 <= start <= self.cache.lengths[slot]:
            raise ValueError(f"prefill at {start} but slot {slot} holds {self.cache.lengths[slot]} rows")
        if start + s > self.max_length:
            raise ValueError(f"{start} cached + {s} new tokens exceed max_length {self.max_length}")
        n_img = int((ids < 0).sum())
        n_feat = 0 if features is None else int(features.shape[0])
        if n_img != n_feat:
            raise ValueError(f"{n_img} image placeholder positions but {n_feat} image feature rows")
        dev, did = self.device, self.device_id
        host = lambda a: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), dev, did)  # noqa: E731
        b = self.session.io_binding()
        self.cache.bind(b, slot, 1)
        self._bind_tables(b)
        b.bind_ortvalue_input(fmt.INPUT_IDS, host(ids))
        b.bind_ortvalue_input(fmt.POSITION_IDS, host(table_rows(np.arange(start, start + s)[None], long,
                                                                self.max_length)))
        b.bind_ortvalue_input(fmt.SEQLENS_K, host(np.array([start + s - 1], np.int32)))
        if n_feat:
            b.bind_ortvalue_input(fmt.IMAGE_FEATURES, host(features.astype(self.io_dtype, copy=False)))
        else:
            b.bind_ortvalue_input(fmt.IMAGE_FEATURES, self.no_features)
        if self.all_logits:  # test-only bundles: [1, S, vocab] comes back; keep the last row
            b.bind_output(fmt.LOGITS, dev, did)
        else:
            self.logits.bind_output(b, fmt.LOGITS, slot, 1)
        self._set_total(start + s)
        self.cache.lengths[slot] = start  # rows from `start` on are being rewritten
        self.session.run_with_iobinding(b, self._prefill_ro)
        if self.all_logits:
            last = b.get_outputs()[0].numpy()[:, -1:, :]
            self.logits.host[slot] = last[0]
            if self.device != "cpu":
                self.logits.value.update_inplace(self.logits.host)
        self.cache.lengths[slot] = start + s

    def step(self, b: int, tokens, positions, long) -> None:
        """One decode step over slots 0..b-1: row r takes token tokens[r] at position positions[r] (under the
        long factors where long[r]). Rows given position None are idle: they write past their slot's valid rows."""
        m = self.max_length
        totals = []
        for r in range(b):
            pos = positions[r]
            if pos is None:  # idle row: token 0 at the slot's length (kept below M), nothing read back
                pos = min(self.cache.lengths[r], m - 1)
                self.step_ids.host[r, 0] = 0
                self.step_pos.host[r, 0] = pos
            else:
                if pos != self.cache.lengths[r] or pos >= m:
                    raise ValueError(f"slot {r}: decode at position {pos} but it holds {self.cache.lengths[r]} rows "
                                     f"(max_length {m})")
                self.step_ids.host[r, 0] = tokens[r]
                self.step_pos.host[r, 0] = pos + (m if long[r] else 0)
            self.seqlens_k.host[r] = pos
            totals.append(pos + 1)
        for buf in (self.step_ids, self.step_pos, self.seqlens_k):
            buf.push()
        self._set_total(max(totals), replayed=True)
        bd, ro = self._step_binding(b)
        self.session.run_with_iobinding(bd, ro)
        for r in range(b):
            if positions[r] is not None:
                self.cache.lengths[r] += 1

    # ---- reading the result --------------------------------------------------------------------
    def argmax(self, start: int, rows: int) -> np.ndarray:
        """Greedy tokens of logits rows start..start+rows-1 (on the device under CUDA: 8 bytes a row come back)."""
        if self.device == "cpu":
            return np.argmax(self.logits.rows(start, rows).reshape(rows, -1), axis=-1)
        return self.head.argmax(start, rows)

    def logits_rows(self, start: int, rows: int) -> np.ndarray:
        """Host logits [rows, vocab] (a view on the CPU: read it before the next run)."""
        return self.logits.rows(start, rows).reshape(rows, -1)

    def copy_slot(self, src: int, dst: int, rows: int) -> None:
        self.cache.copy_slot(src, dst, rows, self.head.device_copy)


class LogitsHead:
    """Tiny ONNX graphs for CUDA: ArgMax over a range of logits rows, and a device-to-device copy (Identity
    between two bound addresses). Built here from protobuf bytes: no onnx dependency. Unused on the CPU,
    where numpy reads the logits in place."""

    def __init__(self, dec: Decoder, provider: str, device_id: int):
        self.dec, self.provider, self.device_id = dec, provider, device_id
        self._argmax = self._copy = None
        self._argmax_b: dict[tuple[int, int], ort.IOBinding] = {}
        self._out = None

    def argmax(self, start: int, rows: int) -> np.ndarray:
        dec = self.dec
        if self._argmax is None:
            in_type = _ONNX_TYPES[np.dtype(dec.logits_dtype)]
            self._argmax = create_session(_argmax_model(in_type), self.provider, device_id=self.device_id,
                                          what="argmax graph")
            self._out = _Buffer((dec.max_batch, 1), np.int64, dec.device, self.device_id)
        key = (start, rows)
        if key not in self._argmax_b:
            b = self._argmax.io_binding()
            dec.logits.bind_input(b, "logits", start, rows)
            self._out.bind_output(b, "token", start, rows)
            self._argmax_b[key] = b
        self._argmax.run_with_iobinding(self._argmax_b[key])
        return self._out.rows(start, rows).reshape(-1)

    def device_copy(self, src_ptr: int, dst_ptr: int, nbytes: int) -> None:
        if self._copy is None:
            self._copy = create_session(_copy_model(), self.provider, device_id=self.device_id, what="copy graph")
        b = self._copy.io_binding()
        dev = self.dec.device
        b.bind_input("x", dev, self.device_id, np.uint8, [nbytes], src_ptr)
        b.bind_output("y", dev, self.device_id, np.uint8, [nbytes], dst_ptr)
        self._copy.run_with_iobinding(b)


class Vision:
    """vision.onnx: valid crops + layout_index -> image features [T, hidden] (host numpy). Thread-safe (ONNX
    Runtime sessions may run concurrently): the engine runs it in the submitting thread."""

    def __init__(self, path: str | Path, provider: str = "cpu", *, device_id: int = 0, threads: int | None = None):
        self.session = create_session(path, provider, device_id=device_id, threads=threads, what=Path(path).name)
        ins = {i.name: i for i in self.session.get_inputs()}
        if fmt.PIXEL_VALUES not in ins or fmt.LAYOUT_INDEX not in ins:
            raise BundleError(f"vision.onnx needs inputs {fmt.PIXEL_VALUES} and {fmt.LAYOUT_INDEX}; "
                              f"it has {sorted(ins)}")
        self.pixel_dtype = numpy_dtype(ins[fmt.PIXEL_VALUES].type)

    def __call__(self, crops: np.ndarray, layout: np.ndarray) -> np.ndarray:
        feeds = {fmt.PIXEL_VALUES: np.ascontiguousarray(crops, dtype=self.pixel_dtype),
                 fmt.LAYOUT_INDEX: np.ascontiguousarray(layout, dtype=np.int64)}
        return self.session.run(None, feeds)[0]


# ---- a minimal ONNX protobuf writer for the two tiny graphs ---------------------------------------
_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}
_INT64 = 7
_UINT8 = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _f_int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _f_bytes(field: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, dims: list) -> bytes:
    shape = b"".join(_f_bytes(1, _f_int(1, d) if isinstance(d, int) else _f_bytes(2, d)) for d in dims)
    tensor = _f_int(1, elem_type) + _f_bytes(2, shape)
    return _f_bytes(1, name) + _f_bytes(2, _f_bytes(1, tensor))


def _node(op: str, inputs: list[str], outputs: list[str], **int_attrs) -> bytes:
    n = b"".join(_f_bytes(1, i) for i in inputs) + b"".join(_f_bytes(2, o) for o in outputs)
    n += _f_bytes(3, f"{op.lower()}_0") + _f_bytes(4, op)
    for k, v in int_attrs.items():
        n += _f_bytes(5, _f_bytes(1, k) + _f_int(3, v) + _f_int(20, 2))  # AttributeProto INT
    return n


def _model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    g = b"".join(_f_bytes(1, n) for n in nodes) + _f_bytes(2, "phi3v_edge_head")
    g += b"".join(_f_bytes(11, i) for i in inputs) + b"".join(_f_bytes(12, o) for o in outputs)
    opset = _f_bytes(1, "") + _f_int(2, 17)
    return _f_int(1, 8) + _f_bytes(2, "phi3v-edge") + _f_bytes(7, g) + _f_bytes(8, opset)


def _as_float(in_type: int, name: str, nodes: list[bytes]) -> str:
    if in_type == 1:
        return name
    nodes.append(_node("Cast", [name], [name + "_f32"], to=1))
    return name + "_f32"


def _argmax_model(in_type: int) -> bytes:
    """logits [B, 1, vocab] -> token int64 [B, 1]."""
    nodes: list[bytes] = []
    x = _as_float(in_type, "logits", nodes)
    nodes.append(_node("ArgMax", [x], ["token"], axis=-1, keepdims=0))
    return _model(nodes, [_value_info("logits", in_type, ["batch", 1, "vocab"])],
                  [_value_info("token", _INT64, ["batch", 1])])


def _copy_model() -> bytes:
    """x uint8 [n] -> y uint8 [n] (Identity: with both bound to device addresses, a device-to-device copy)."""
    return _model([_node("Identity", ["x"], ["y"])], [_value_info("x", _UINT8, ["n"])], [_value_info("y", _UINT8, ["n"])])
