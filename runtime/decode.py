"""The decoder loop's machinery: prefill and one-token decode steps over IOBinding with preallocated buffers.

Buffers (allocated once per runtime, on the session's device; B = 1, M = max_length):
    kv cache        [1, kv_heads, M, head_dim] x 2 x layers   past and present bound to the same buffer
    step_ids        int64 [1, 1]      the decode step's input token (written by the on-device ArgMax)
    no_features     io    [0, hidden] image_features of a decode step (no image rows)
    seqlens_k       int32 [1]         total length after the call - 1          (device)
    total_len       int32 []          total length after the call              (host: GQA reads it on the CPU)
    cos, sin        io    [M, head_dim/2]  the LongRoPE table in use (short or long, rewritten in place)
    logits          io    [1, 1, vocab]    last position's logits

A decode step writes three small host values into their fixed buffers (token only when it did not come
from the device ArgMax) and runs the decoder on the one IOBinding that was bound at start-up: no
allocation, no rebinding, fixed addresses, which is what CUDA graph capture/replay needs. Greedy decoding
reads back 8 bytes per step (the token, for the stop check and the detokenizer); the logits stay put.
On CUDA with `cuda_graph=True`, decode steps run with `gpu_graph_id` 1: ONNX Runtime runs the first such
step normally, captures the graph on the next, and replays it afterwards. Prefill runs with id -1 (no
graph): its shapes change with every prompt.
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

DECODE_GRAPH_ID = 1  # the CUDA graph of the decode step (one per runtime: batch 1, one max_length)


class Decoder:
    """decoder.onnx with its KV cache and step buffers."""

    def __init__(self, path: str | Path, rope: dict, max_length: int, provider: str = "cpu", *,
                 device_id: int = 0, cuda_graph: bool = False, threads: int | None = None,
                 all_logits: bool = False):
        self.provider, self.device, self.device_id = provider, device_of(provider), device_id
        self.cuda_graph = bool(cuda_graph)
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
        self.max_length = int(max_length)
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

        dev, did = self.device, self.device_id
        new = ort.OrtValue.ortvalue_from_shape_and_type
        self.cache = KVCache(self.num_layers, self.kv_heads, self.head_dim, self.max_length, self.kv_dtype, dev, did)
        self.step_ids = new([1, 1], np.int64, dev, did)
        self.no_features = new([0, self.hidden], self.io_dtype, dev, did)
        self.seqlens_k = new([1], np.int32, dev, did)
        self.step_pos = new([1, 1], np.int64, dev, did)
        self.total_len = ort.OrtValue.ortvalue_from_numpy(np.zeros((), np.int32))  # host, as GQA wants it
        cos, sin = stacked_tables(self.rope, self.head_dim, self.max_length, self.rope_dtype)
        self.cos = ort.OrtValue.ortvalue_from_numpy(cos, dev, did)
        self.sin = ort.OrtValue.ortvalue_from_numpy(sin, dev, did)
        self.logits = new([1, 1, self.vocab_size], self.logits_dtype, dev, did)
        # host scratch written into the fixed buffers
        self._ids_host = np.zeros((1, 1), np.int64)
        self._seq_host = np.zeros((1,), np.int32)
        self._tot_host = np.zeros((), np.int32)
        self._pos_host = np.zeros((1, 1), np.int64)
        self.rope_long = False

        self._step_binding = self.session.io_binding()
        self._bind_common(self._step_binding)
        self._step_binding.bind_ortvalue_input(fmt.INPUT_IDS, self.step_ids)
        self._step_binding.bind_ortvalue_input(fmt.IMAGE_FEATURES, self.no_features)
        self._step_binding.bind_ortvalue_input(fmt.POSITION_IDS, self.step_pos)
        self._step_binding.bind_ortvalue_output(fmt.LOGITS, self.logits)
        self._step_ro = run_options(DECODE_GRAPH_ID if self.cuda_graph else None)
        self._prefill_ro = run_options(-1 if self.cuda_graph else None)
        self.head = LogitsHead(self, provider, device_id)

    # ---- set-up --------------------------------------------------------------------------------
    @staticmethod
    def _check_io(ins, outs) -> None:
        need_in = [fmt.INPUT_IDS, fmt.IMAGE_FEATURES, fmt.SEQLENS_K, fmt.TOTAL_SEQ_LEN, fmt.COS_CACHE, fmt.SIN_CACHE,
                   *fmt.past_names(0)]
        missing = [n for n in need_in if n not in ins] + [n for n in (fmt.LOGITS, *fmt.present_names(0)) if n not in outs]
        if missing:
            raise BundleError(f"decoder.onnx lacks the inputs/outputs {missing} of the bundle contract "
                              "(see phi3v_edge.runtime.bundle)")
        n = sum(1 for k in ins if k.startswith("past_key_values.") and k.endswith(".key"))
        for i in range(n):
            for name in (*fmt.past_names(i), *fmt.present_names(i)):
                if name not in ins and name not in outs:
                    raise BundleError(f"decoder.onnx lacks {name}")

    def _bind_common(self, b: ort.IOBinding) -> None:
        self.cache.bind(b)
        b.bind_ortvalue_input(fmt.SEQLENS_K, self.seqlens_k)
        b.bind_ortvalue_input(fmt.TOTAL_SEQ_LEN, self.total_len)
        b.bind_ortvalue_input(fmt.COS_CACHE, self.cos)
        b.bind_ortvalue_input(fmt.SIN_CACHE, self.sin)

    def set_rope(self, long: bool) -> None:
        """Use the short or long LongRoPE factors from the next call on (an offset into the stacked tables)."""
        self.rope_long = bool(long)

    def _set_lengths(self, total: int) -> None:
        self._seq_host[0] = total - 1
        self.seqlens_k.update_inplace(self._seq_host)
        self._tot_host[()] = total
        self.total_len.update_inplace(self._tot_host)

    # ---- the two kinds of run ------------------------------------------------------------------
    def prefill(self, ids: np.ndarray, features: np.ndarray | None = None) -> None:
        """Append `ids` [S] (negative = image rows, filled in order from `features` [T, hidden]) after the
        cached rows; leaves the last position's logits in `self.logits`."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        s = ids.shape[1]
        start = self.cache.length
        if s == 0:
            raise ValueError("prefill needs at least one token")
        if start + s > self.max_length:
            raise ValueError(f"{start} cached + {s} new tokens exceed max_length {self.max_length}")
        n_img = int((ids < 0).sum())
        n_feat = 0 if features is None else int(features.shape[0])
        if n_img != n_feat:
            raise ValueError(f"{n_img} image placeholder positions but {n_feat} image feature rows")
        dev, did = self.device, self.device_id
        b = self.session.io_binding()
        self._bind_common(b)
        b.bind_ortvalue_input(fmt.INPUT_IDS, ort.OrtValue.ortvalue_from_numpy(ids, dev, did))
        if n_feat:
            f = np.ascontiguousarray(features, dtype=self.io_dtype)
            b.bind_ortvalue_input(fmt.IMAGE_FEATURES, ort.OrtValue.ortvalue_from_numpy(f, dev, did))
        else:
            b.bind_ortvalue_input(fmt.IMAGE_FEATURES, self.no_features)
        if self.all_logits:  # test-only bundles: [1, S, vocab] comes back; keep the last row
            b.bind_output(fmt.LOGITS, dev, did)
        else:
            b.bind_ortvalue_output(fmt.LOGITS, self.logits)
        self._set_lengths(start + s)
        pos = table_rows(np.arange(start, start + s)[None], self.rope_long, self.max_length)
        b.bind_ortvalue_input(fmt.POSITION_IDS, ort.OrtValue.ortvalue_from_numpy(pos, dev, did))
        self.session.run_with_iobinding(b, self._prefill_ro)
        if self.all_logits:
            last = b.get_outputs()[0].numpy()[:, -1:, :]
            self.logits.update_inplace(np.ascontiguousarray(last, dtype=self.logits_dtype))
        self.cache.advance(s)

    def step(self, token: int | None = None) -> None:
        """Run one token at the next position. token=None: `step_ids` already holds it (device ArgMax)."""
        total = self.cache.length + 1
        if total > self.max_length:
            raise ValueError(f"decode step would exceed max_length {self.max_length}")
        if token is not None:
            self._ids_host[0, 0] = token
            self.step_ids.update_inplace(self._ids_host)
        self._set_lengths(total)
        self._pos_host[0, 0] = total - 1 + (self.max_length if self.rope_long else 0)
        self.step_pos.update_inplace(self._pos_host)
        self.session.run_with_iobinding(self._step_binding, self._step_ro)
        self.cache.advance(1)

    # ---- reading the result --------------------------------------------------------------------
    def argmax(self) -> int:
        """Greedy token of the current logits, computed on the device and written into `step_ids`
        (so the next step needs no host->device write); returns it (an 8-byte read)."""
        return self.head.argmax()

    def logits_numpy(self) -> np.ndarray:
        """Host copy of the last position's logits [vocab] (sampling, tests)."""
        return self.logits.numpy().reshape(-1)

    def topk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(values [k] float32, ids [k] int64) of the k largest logits, selected on the device."""
        return self.head.topk(k)


class LogitsHead:
    """Tiny ONNX graphs run on the bound logits buffer: ArgMax (output bound to the decoder's step_ids
    buffer) and TopK (k values + ids to the host). Built here from protobuf bytes: no onnx dependency."""

    def __init__(self, dec: Decoder, provider: str, device_id: int):
        self.dec = dec
        in_type = _ONNX_TYPES[np.dtype(dec.logits_dtype)]
        self._argmax = create_session(_argmax_model(in_type), provider, device_id=device_id, what="argmax graph")
        self._argmax_b = self._argmax.io_binding()
        self._argmax_b.bind_ortvalue_input("logits", dec.logits)
        self._argmax_b.bind_ortvalue_output("token", dec.step_ids)
        self._topk = None
        self._k = None
        self.provider, self.device_id = provider, device_id

    def argmax(self) -> int:
        self._argmax.run_with_iobinding(self._argmax_b)
        return int(self.dec.step_ids.numpy().reshape(-1)[0])

    def topk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(min(k, self.dec.vocab_size))
        if self._topk is None:
            in_type = _ONNX_TYPES[np.dtype(self.dec.logits_dtype)]
            self._topk = create_session(_topk_model(in_type), self.provider, device_id=self.device_id,
                                        what="top-k graph")
        if self._k is None or self._k[0] != k:  # bound once per k: K and both outputs live on the host
            host = ort.OrtValue.ortvalue_from_numpy
            kv, values, ids = host(np.array([k], np.int64)), host(np.zeros((1, 1, k), np.float32)), \
                host(np.zeros((1, 1, k), np.int64))
            b = self._topk.io_binding()
            b.bind_ortvalue_input("logits", self.dec.logits)
            b.bind_ortvalue_input("k", kv)
            b.bind_ortvalue_output("values", values)
            b.bind_ortvalue_output("ids", ids)
            self._k = (k, b, kv, values, ids)
        _, b, _, values, ids = self._k
        self._topk.run_with_iobinding(b)
        return values.numpy().reshape(-1), ids.numpy().reshape(-1)


class Vision:
    """vision.onnx: valid crops + layout_index -> image features [T, hidden] (host numpy)."""

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
    """logits [1, 1, vocab] -> token int64 [1, 1]."""
    nodes: list[bytes] = []
    x = _as_float(in_type, "logits", nodes)
    nodes.append(_node("ArgMax", [x], ["token"], axis=-1, keepdims=0))
    return _model(nodes, [_value_info("logits", in_type, [1, 1, "vocab"])], [_value_info("token", _INT64, [1, 1])])


def _topk_model(in_type: int) -> bytes:
    """logits [1, 1, vocab], k int64 [1] -> values float32 [1, 1, k], ids int64 [1, 1, k] (largest first)."""
    nodes: list[bytes] = []
    x = _as_float(in_type, "logits", nodes)
    nodes.append(_node("TopK", [x, "k"], ["values", "ids"], axis=-1, largest=1, sorted=1))
    return _model(nodes, [_value_info("logits", in_type, [1, 1, "vocab"]), _value_info("k", _INT64, [1])],
                  [_value_info("values", 1, [1, 1, "k"]), _value_info("ids", _INT64, [1, 1, "k"])])

