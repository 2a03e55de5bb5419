"""decoder.onnx, built directly from the checkpoint's weights (no tracing), one tensor at a time.

I/O: exactly the contract in runtime/bundle.py (input_ids [B, S] with negative image placeholders,
image_features, position_ids, past_key_values.{i}.key/.value [B, kv_heads, max_length, head_dim] shared with
present.{i}.*, seqlens_k [B], total_sequence_length, cos_cache / sin_cache [2 * max_length, head_dim / 2]
-> logits [B, 1, vocab], present.{i}.*). The graph, with B rows of S new tokens:

    ids+ = Max(input_ids, 0);  tok = Gather(embed, ids+)                      [B, S, hidden]
    mask = input_ids < 0;  feats = Concat(zero row, image_features)          [T+1, hidden]
    idx = CumSum(mask) * mask;  x = Where(mask, Gather(feats, idx), tok)    (row k of image_features at the
                                                                             k-th negative id; image rows
                                                                             only with B = 1: prefill)
    per layer i:
      h, r = SkipSimplifiedLayerNormalization(prev_out, r, input_layernorm)  (layer 0: SimplifiedLayerNorm(x), r = x)
      qkv  = MatMulNBits | MatMul (qkv_proj [9216, 3072], Q|K|V);  q, k, v = Split(qkv)
      q, k = com.microsoft.RotaryEmbedding(q | k, position_ids, cos_cache, sin_cache; interleaved=0)
      a    = com.microsoft.GroupQueryAttention(q, k, v, past k/v, seqlens_k, total_sequence_length; do_rotary=0)
      o    = o_proj(a)
      h, r = SkipSimplifiedLayerNormalization(o, r, post_attention_layernorm)
      g, u = Split(gate_up_proj(h))                                          (gate first, then up)
      prev_out = down_proj(u * g * Sigmoid(g))
    (last position only unless all_logits: Slice(prev_out), Slice(r))
    y = SkipSimplifiedLayerNormalization(prev_out, r, model.norm);  logits = lm_head(y)

Why rotary outside GroupQueryAttention (format version 2): continuous batching puts rows of different
lengths in one decode step, and each row has its own LongRoPE state (a long conversation past
original_max_position_embeddings uses the long factors while a short one beside it keeps the short ones).
GQA's built-in rotary takes ONE cos/sin table for the whole batch and derives positions from seqlens_k.
With RotaryEmbedding fed explicit position_ids into a stacked [short; long] table (row p: short factors
at position p; row max_length + p: long factors), every row picks its own factor set and position, the
runtime owns both, and nothing else changes for a CUDA graph (position_ids is one more fixed buffer).
The cost is one Split and two small elementwise ops per layer.

GroupQueryAttention on ONNX Runtime 1.31, CPU provider (measured: a single-node GQA graph against a numpy
reference, kv_heads < heads, fp32 error ~3e-7, fp16 ~1e-3; and the full decoder in tests/test_decoder_export.py):
  (a) prompt with empty past: past buffers of max_length M (contents ignored), seqlens_k = [S - 1],
      total_sequence_length = S: works. Rotary positions 0..S-1.
  (b) decode one token: seqlens_k = [total - 1], total_sequence_length = total: works with the past buffer of
      length M; binding THE SAME OrtValue as input past_key_values.{i}.* and as output present.{i}.*
      (IOBinding bind_ortvalue_input + bind_ortvalue_output) works: the kernel detects the shared buffer and
      writes the new rows in place at positions total-S .. total-1. (Without sharing, ORT allocates a present of
      length max(M, total) = M and copies the past: also correct, just slower.)
  (c) subsequent prompt: S > 1 new tokens after a non-empty past (past = total - S): works (e.g. chunks
      8+4+1+3, 1+1+1+5+2), positions past..total-1. This covers multi-turn prefill of only the new tokens and
      chunked prefill. A LongRoPE recompute is simply a new first prompt (past 0, S = total) written over
      the same buffers with the long tables bound.
  Rotary position of query s is (total_sequence_length - S + s), derived by the op from seqlens_k and
  total_sequence_length; the rows of the buffer beyond total are ignored (garbage there is harmless).
  cos_cache / sin_cache must be in the activation dtype, [>= total, head_dim/2].
  So the working binding scheme is the one runtime/bundle.py states: one buffer per layer and K/V, bound as
  both past and present, every call (prefill, subsequent prompt, decode).

MatMulNBits accuracy_level: 0 by default (exact fp32 math on CPU); 4 would quantize activations to int8 on
CPU (~5e-3 relative error per matmul, faster). CUDA ignores it. See export/graph_builder.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto

from phi3v_edge.models.config import Phi3VConfig
from phi3v_edge.runtime import bundle as fmt

from .graph_builder import PRECISIONS, GraphBuilder
from .options import EMBEDDING_PRECISIONS, IO_DTYPES, check_block_size, check_choice
from .quantize import dequantize, quantize

MAX_LENGTH_DIM = "max_length"
ROPE_ROWS_DIM = "rope_rows"  # 2 * max_length: the short table, then the long one


@dataclass(frozen=True)
class DecoderOptions:
    precision: str
    io_dtype: str
    block_size: int
    symmetric: bool
    lm_head_precision: str
    embedding_precision: str
    all_logits: bool
    accuracy_level: int

    @property
    def np_io(self):
        return np.dtype(self.io_dtype)


def resolve_options(cfg: Phi3VConfig, precision: str, io_dtype: str | None = None, block_size: int = 32,
                    symmetric: bool = True, lm_head_precision: str | None = None,
                    embedding_precision: str | None = None, all_logits: bool = False,
                    accuracy_level: int = 0) -> DecoderOptions:
    """Validate the options (clear ValueErrors) and fill the defaults:
    io_dtype: float32 for fp32, float16 otherwise; lm_head: the layers' precision;
    embedding: fp32 for fp32, fp16 otherwise."""
    check_choice(precision, PRECISIONS, "precision")  # the checks: export/options.py (ExportError, a ValueError)
    io_dtype = check_choice(io_dtype or ("float32" if precision == "fp32" else "float16"), IO_DTYPES, "io_dtype")
    lm_head_precision = check_choice(lm_head_precision or precision, PRECISIONS, "lm_head precision")
    embedding_precision = check_choice(embedding_precision or ("fp32" if precision == "fp32" else "fp16"),
                                       EMBEDDING_PRECISIONS, "embedding precision")
    quantized = {precision, lm_head_precision, embedding_precision} & {"int4", "int8"}
    if quantized:
        ks = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_attention_heads * head_dim": cfg.q_size}
        if precision not in ("int4", "int8"):  # only the lm_head / embedding (K = hidden) are quantized
            ks = {"hidden_size": cfg.hidden_size}
        check_block_size(block_size, ks)
    if cfg.head_dim % 2:
        raise ValueError(f"head_dim {cfg.head_dim} must be even for rotary embeddings")
    return DecoderOptions(precision, io_dtype, int(block_size), bool(symmetric), lm_head_precision,
                          embedding_precision, bool(all_logits), int(accuracy_level))


# ---- effective weights (shared by the graph and dequantized_state_dict) ---------------------------------
def _bits(precision: str) -> int:
    return 4 if precision == "int4" else 8


def _effective_linear(w: np.ndarray, precision: str, o: DecoderOptions) -> np.ndarray:
    """The [N, K] fp32 weight the graph multiplies by."""
    if precision in ("int4", "int8"):
        return dequantize(quantize(w, _bits(precision), o.block_size, o.symmetric, scale_dtype=o.np_io))
    if precision == "fp16" or o.io_dtype == "float16":  # fp16 weight, or an fp32 weight cast to fp16 activations
        return w.astype(np.float16).astype(np.float32)
    return w


def _quantize_embedding_int8(w: np.ndarray, block_size: int, scale_dtype):
    """Symmetric blockwise int8 along hidden: q int8 [V, hidden], scales [V, hidden / block_size]
    (scale = absmax / 127, round half away from zero)."""
    v, h = w.shape
    blocks = w.reshape(v, h // block_size, block_size)
    scale = (np.abs(blocks).max(-1) / np.float32(127)).astype(scale_dtype)
    s32 = scale.astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = np.where(s32 != 0, np.float32(1) / s32, np.float32(0))
    x = blocks * recip[..., None]
    q = np.clip(np.trunc(x) + np.where(np.abs(x - np.trunc(x)) >= 0.5, np.sign(x), 0), -127, 127).astype(np.int8)
    return q.reshape(v, h), scale


def _effective_embedding(w: np.ndarray, o: DecoderOptions) -> np.ndarray:
    if o.embedding_precision == "int8":
        q, s = _quantize_embedding_int8(w, o.block_size, o.np_io)
        v, h = w.shape
        e = (q.reshape(v, h // o.block_size, o.block_size).astype(np.float32) * s.astype(np.float32)[..., None])
        e = e.reshape(v, h)
        if o.io_dtype == "float16":  # the product is taken in fp16
            e = (q.reshape(v, h // o.block_size, o.block_size).astype(np.float16) * s[..., None]).reshape(v, h)
            e = e.astype(np.float32)
        return e
    if o.embedding_precision == "fp16" or o.io_dtype == "float16":
        return w.astype(np.float16).astype(np.float32)
    return w


def _get(reader, name: str, shape) -> np.ndarray:
    """One checkpoint tensor as float32 numpy [shape] (plain file reads: flat RSS while streaming)."""
    return reader.numpy(name, tuple(shape))


def _names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {"qkv": p + "self_attn.qkv_proj.weight", "o": p + "self_attn.o_proj.weight",
            "gate_up": p + "mlp.gate_up_proj.weight", "down": p + "mlp.down_proj.weight",
            "ln_in": p + "input_layernorm.weight", "ln_post": p + "post_attention_layernorm.weight"}


def _shapes(cfg: Phi3VConfig) -> dict[str, tuple[int, ...]]:
    h = cfg.hidden_size
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, h), "o": (h, cfg.q_size), "gate_up": (2 * cfg.intermediate_size, h),
            "down": (h, cfg.intermediate_size), "ln_in": (h,), "ln_post": (h,)}


def dequantized_state_dict(reader, cfg: Phi3VConfig, precision: str, io_dtype: str | None = None,
                           block_size: int = 32, symmetric: bool = True, lm_head_precision: str | None = None,
                           embedding_precision: str | None = None, **_ignored) -> dict:
    """The decoder weights the graph built with the same options effectively uses, as fp32 torch tensors
    under the reference model's names (quantize -> dequantize, fp16 rounding): load them into
    Phi3VForCausalLM (strict=False: vision weights untouched) to get the graph's exact reference."""
    import torch

    o = resolve_options(cfg, precision, io_dtype, block_size, symmetric, lm_head_precision, embedding_precision)
    out = {}
    h = cfg.hidden_size
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    norm = lambda a: a.astype(o.np_io).astype(np.float32)  # noqa: E731 - norm weights are stored in the io dtype
    out["model.embed_tokens.weight"] = t(_effective_embedding(_get(reader, "model.embed_tokens.weight",
                                                                   (cfg.vocab_size, h)), o))
    shapes = _shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        for key, name in _names(i).items():
            w = _get(reader, name, shapes[key])
            out[name] = t(norm(w) if key.startswith("ln") else _effective_linear(w, o.precision, o))
    out["model.norm.weight"] = t(norm(_get(reader, "model.norm.weight", (h,))))
    out["lm_head.weight"] = t(_effective_linear(_get(reader, "lm_head.weight", (cfg.vocab_size, h)),
                                                o.lm_head_precision, o))
    return out


# ---- the graph ---------------------------------------------------------------------------------------
# attention(gb, layer, qkv) -> attention output [B, S, H * head_dim]: qkv is the packed Q|K|V projection
AttentionFn = Callable[[GraphBuilder, int, str], str]


def decoder_layers(gb: GraphBuilder, reader, cfg: Phi3VConfig, o: DecoderOptions, x: str, attention: AttentionFn,
                   progress: Callable[[int, int], None] | None = None) -> tuple[str, str]:
    """The decoder blocks on x [B, S, hidden], streaming one layer's weights at a time; `attention` builds each
    layer's attention from its packed qkv. Returns (y, r): the last block's output and the residual stream
    before it (the final norm adds them). Shared by decoder.onnx and the onnxruntime-genai text graph."""
    n_layers = cfg.num_hidden_layers
    shapes = _shapes(cfg)
    lin = dict(precision=o.precision, block_size=o.block_size, symmetric=o.symmetric)
    r = None  # residual stream
    y = x  # output of the previous block, to be added to r
    for i in range(n_layers):
        nm = _names(i)
        pre = f"layers.{i}"
        ln_in = gb.initializer(f"{pre}.input_layernorm.weight", _get(reader, nm["ln_in"], shapes["ln_in"]).astype(o.np_io))
        if r is None:
            hs = gb.node("SimplifiedLayerNormalization", [y, ln_in], name=f"{pre}/input_layernorm",
                         epsilon=float(cfg.rms_norm_eps), axis=-1, stash_type=1)
            r = y
        else:
            hs, r = _skip_norm(gb, y, r, ln_in, cfg, f"{pre}/input_layernorm")
        qkv = gb.linear(hs, f"{pre}.self_attn.qkv_proj", _get(reader, nm["qkv"], shapes["qkv"]), **lin)
        attn = attention(gb, i, qkv)
        a = gb.linear(attn, f"{pre}.self_attn.o_proj", _get(reader, nm["o"], shapes["o"]), **lin)
        ln_post = gb.initializer(f"{pre}.post_attention_layernorm.weight",
                                 _get(reader, nm["ln_post"], shapes["ln_post"]).astype(o.np_io))
        hs, r = _skip_norm(gb, a, r, ln_post, cfg, f"{pre}/post_attention_layernorm")
        gu = gb.linear(hs, f"{pre}.mlp.gate_up_proj", _get(reader, nm["gate_up"], shapes["gate_up"]), **lin)
        gate, up = gb.node("Split", [gu], outputs=2, name=f"{pre}/mlp/Split", axis=-1, num_outputs=2)
        act = gb.node("Mul", [gate, gb.node("Sigmoid", [gate], name=f"{pre}/mlp/Sigmoid")], name=f"{pre}/mlp/silu")
        m = gb.node("Mul", [up, act], name=f"{pre}/mlp/Mul")
        y = gb.linear(m, f"{pre}.mlp.down_proj", _get(reader, nm["down"], shapes["down"]), **lin)
        if progress:
            progress(i + 1, n_layers)
    return y, r


def final_logits(gb: GraphBuilder, reader, cfg: Phi3VConfig, o: DecoderOptions, y: str, r: str,
                 last_only: bool) -> str:
    """Final norm and lm_head (on the last position only when last_only) -> logits [B, 1 or S, vocab]."""
    if last_only:
        last = dict(starts=gb.const([-1], np.int64), ends=gb.const([np.iinfo(np.int64).max], np.int64),
                    axes=gb.const([1], np.int64))
        y = gb.node("Slice", [y, last["starts"], last["ends"], last["axes"]], name="last/Slice_y")
        r = gb.node("Slice", [r, last["starts"], last["ends"], last["axes"]], name="last/Slice_r")
    h = cfg.hidden_size
    norm_w = gb.initializer("model.norm.weight", _get(reader, "model.norm.weight", (h,)).astype(o.np_io))
    yn, _ = _skip_norm(gb, y, r, norm_w, cfg, "final_norm")
    return gb.linear(yn, "lm_head", _get(reader, "lm_head.weight", (cfg.vocab_size, h)),
                     precision=o.lm_head_precision, block_size=o.block_size, symmetric=o.symmetric)


def rotary_attention(gb: GraphBuilder, cfg: Phi3VConfig, i: int, qkv: str, pos: str, cos: str, sin: str,
                     past: tuple[str, str], seqlens: str, total: str, present: tuple[str, str]) -> str:
    """Layer i's attention from its packed qkv: Split, RotaryEmbedding of q and k at `pos` (rows of the stacked
    [short; long] LongRoPE tables), GroupQueryAttention without its own rotary over the shared past/present
    buffers. Rotary outside GQA lets each batch row pick its own factor set and position (module docstring).
    Shared by decoder.onnx and the onnxruntime-genai text graph."""
    pre = f"layers.{i}"
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    split = gb.const([cfg.q_size, cfg.kv_size, cfg.kv_size], np.int64)
    q, k, v = gb.node("Split", [qkv, split], outputs=3, name=f"{pre}/attn/Split_qkv", axis=-1)
    q = gb.ms("RotaryEmbedding", [q, pos, cos, sin], name=f"{pre}/attn/rotary_q", interleaved=0, num_heads=H)
    k = gb.ms("RotaryEmbedding", [k, pos, cos, sin], name=f"{pre}/attn/rotary_k", interleaved=0, num_heads=KV)
    return gb.ms("GroupQueryAttention", [q, k, v, past[0], past[1], seqlens, total],
                 outputs=[f"{pre}/attn", *present], name=f"{pre}/GroupQueryAttention",
                 num_heads=H, kv_num_heads=KV, do_rotary=0)[0]


def build_decoder(reader, cfg: Phi3VConfig, out_dir: str | Path, *, precision: str, io_dtype: str | None = None,
                  block_size: int = 32, symmetric: bool = True, lm_head_precision: str | None = None,
                  embedding_precision: str | None = None, all_logits: bool = False, accuracy_level: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Write decoder.onnx + decoder.onnx.data into out_dir from the checkpoint `reader` (CheckpointReader),
    streaming one tensor at a time. progress(i, n) is called after each of the n layers (i = 1..n).
    Returns the manifest's `decoder` section."""
    o = resolve_options(cfg, precision, io_dtype, block_size, symmetric, lm_head_precision, embedding_precision,
                        all_logits, accuracy_level)
    out_dir = Path(out_dir)
    n_layers, hd = cfg.num_hidden_layers, cfg.head_dim
    h, H, KV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    gb = GraphBuilder(out_dir / fmt.DECODER_FILE, name="phi3v_decoder", io_dtype=o.io_dtype,
                      accuracy_level=o.accuracy_level)
    ft = gb.float_type
    B = fmt.BATCH_DIM
    try:
        ids = gb.input(fmt.INPUT_IDS, TensorProto.INT64, [B, "S"])
        feats_in = gb.input(fmt.IMAGE_FEATURES, ft, ["T", h])
        pos = gb.input(fmt.POSITION_IDS, TensorProto.INT64, [B, "S"])
        pasts = []
        for i in range(n_layers):
            pk, pv = fmt.past_names(i)
            pasts.append((gb.input(pk, ft, [B, KV, MAX_LENGTH_DIM, hd]), gb.input(pv, ft, [B, KV, MAX_LENGTH_DIM, hd])))
        seqlens = gb.input(fmt.SEQLENS_K, TensorProto.INT32, [B])
        total = gb.input(fmt.TOTAL_SEQ_LEN, TensorProto.INT32, [])
        cos = gb.input(fmt.COS_CACHE, ft, [ROPE_ROWS_DIM, hd // 2])
        sin = gb.input(fmt.SIN_CACHE, ft, [ROPE_ROWS_DIM, hd // 2])

        def attention(gb: GraphBuilder, i: int, qkv: str) -> str:
            return rotary_attention(gb, cfg, i, qkv, pos, cos, sin, pasts[i], seqlens, total, fmt.present_names(i))

        x = _embedding(gb, reader, cfg, o, ids, feats_in)
        y, r = decoder_layers(gb, reader, cfg, o, x, attention, progress)
        logits = final_logits(gb, reader, cfg, o, y, r, last_only=not o.all_logits)
        gb.output(logits, ft, [B, "S" if o.all_logits else 1, cfg.vocab_size], name=fmt.LOGITS)
        for i in range(n_layers):
            for nme in fmt.present_names(i):
                gb.output(nme, ft, [B, KV, MAX_LENGTH_DIM, hd])
        gb.save()
    except BaseException:
        gb.close()
        raise
    files = [fmt.DECODER_FILE] + ([gb.data_path.name] if gb.data_path.exists() else [])
    return {
        "file": fmt.DECODER_FILE,
        "data_file": gb.data_path.name if gb.data_path.exists() else None,
        "files": files,
        "precision": o.precision,
        "io_dtype": o.io_dtype,
        "block_size": o.block_size,
        "symmetric": o.symmetric,
        "lm_head_precision": o.lm_head_precision,
        "embedding_precision": o.embedding_precision,
        "accuracy_level": o.accuracy_level,
        "all_logits": o.all_logits,
        "num_layers": n_layers,
        "num_heads": H,
        "num_kv_heads": KV,
        "head_dim": hd,
        "hidden_size": h,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "weight_bytes": gb.external_bytes,
    }


def _skip_norm(gb: GraphBuilder, x: str, skip: str, gamma: str, cfg: Phi3VConfig, name: str):
    """SkipSimplifiedLayerNormalization: -> (norm(x + skip) * gamma, x + skip)."""
    outs = [gb.unique(f"{name}/out"), "", "", gb.unique(f"{name}/sum")]
    gb.ms("SkipSimplifiedLayerNormalization", [x, skip, gamma], outputs=outs, name=name,
          epsilon=float(cfg.rms_norm_eps))
    return outs[0], outs[3]


def _embedding(gb: GraphBuilder, reader, cfg: Phi3VConfig, o: DecoderOptions, ids: str, feats_in: str) -> str:
    """Token embeddings with the image features written at the negative ids -> [1, S, hidden] (io dtype)."""
    h = cfg.hidden_size
    w = _get(reader, "model.embed_tokens.weight", (cfg.vocab_size, h))
    ids_pos = gb.node("Max", [ids, gb.const(0, np.int64)], name="embed/clamp_ids")
    if o.embedding_precision == "int8":
        q, s = _quantize_embedding_int8(w, o.block_size, o.np_io)
        del w
        qt = gb.initializer("model.embed_tokens.weight_int8", q)
        st = gb.initializer("model.embed_tokens.scales", s)
        del q, s
        rows = gb.node("Cast", [gb.node("Gather", [qt, ids_pos], name="embed/Gather_q")], name="embed/Cast_q", to=gb.float_type)
        rows = gb.node("Reshape", [rows, gb.const([0, 0, h // o.block_size, o.block_size], np.int64)], name="embed/Reshape_blocks")
        sc = gb.node("Unsqueeze", [gb.node("Gather", [st, ids_pos], name="embed/Gather_scales"), gb.const([-1], np.int64)],
                     name="embed/Unsqueeze_scales")
        tok = gb.node("Reshape", [gb.node("Mul", [rows, sc], name="embed/dequant"), gb.const([0, 0, h], np.int64)],
                      name="embed/Reshape_rows")
    else:
        wdt = np.float32 if o.embedding_precision == "fp32" else np.float16
        table = gb.initializer("model.embed_tokens.weight", w.astype(wdt))
        del w
        tok = gb.node("Gather", [table, ids_pos], name="embed/Gather")
        if np.dtype(wdt) != o.np_io:
            tok = gb.node("Cast", [tok], name="embed/Cast", to=gb.float_type)
    # image features at the placeholder positions
    mask = gb.node("Less", [ids, gb.const(0, np.int64)], name="embed/is_image")  # [1, S] bool
    mask_i = gb.node("Cast", [mask], name="embed/mask_int", to=TensorProto.INT64)
    idx = gb.node("Mul", [gb.node("CumSum", [mask_i, gb.const(1, np.int64)], name="embed/CumSum"), mask_i],
                  name="embed/feature_index")  # k-th placeholder -> k (1-based), text -> 0
    zero_row = gb.const(np.zeros((1, h), dtype=o.np_io), name="embed/zero_row")
    feats = gb.node("Concat", [zero_row, feats_in], name="embed/Concat_features", axis=0)  # [T+1, hidden]
    img = gb.node("Gather", [feats, idx], name="embed/Gather_features", axis=0)  # [1, S, hidden]
    m3 = gb.node("Unsqueeze", [mask, gb.const([-1], np.int64)], name="embed/Unsqueeze_mask")
    return gb.node("Where", [m3, img, tok], name="embed/Where")
