"""The three graphs of an onnxruntime-genai "phi3v" package, built from the checkpoint's weights.

onnxruntime-genai (src/models/multi_modal.cpp) runs, on the prompt: vision (only when there are image tokens),
then embedding, then text; on every later step: embedding, then text. Its I/O (names in genai_config.json):

vision.onnx
    pixel_values   io    [N, crops + 1, 3, 336, 336]  every image's crop slots, zero padded (global view first)
    image_sizes    int64 [N, 2]                       padded HD size (height, width) of each image
  -> image_features io   [T, hidden]                  T = sum of the images' token counts, images in index order
    A prelude computes what our own vision graph takes as inputs: the valid crops (NonZero over the crop
    slots each image uses, 1 + rows * cols) and layout_index (per output token, vectorised: which image,
    which part of its sub_glb layout), then the unchanged graph of export/vision_graph.py follows. So the
    package's encoder is the bundle's, op for op; 336 / 12 / 144 are runtime/model_facts.py's.

embedding.onnx
    input_ids      int64 [B, S]      image k's placeholder positions hold -k (onnxruntime-genai's convention
                                     and ours)
    image_features io    [T, hidden] (T = 0 after the prompt)
  -> inputs_embeds  io   [B, S, hidden]
    Image k's rows are image_features[start_k : start_k + count_k] (vision order = image index order); a
    permutation puts them in prompt order, so <|image_2|> before <|image_1|> gets the right rows. Then
    export/decoder_graph.py's `_embedding` (token table, fp32 / fp16 / int8, and the placeholder scatter).

text.onnx
    inputs_embeds  io    [B, S, hidden]
    attention_mask int64 [B, total]             onnxruntime-genai's mask (ones; left padding for batches)
    past_key_values.{i}.key / .value  io [B, kv_heads, max_length, head_dim]  (past_present_share_buffer)
  -> logits  io [B, 1, vocab] (last position: onnxruntime-genai sees dim 1 == 1 and keeps only that one)
     present.{i}.key / .value
    Derived inside: seqlens_k = sum(mask) - 1, total_sequence_length = mask width (GroupQueryAttention's
    inputs), position_ids = seqlens_k + 1 - S + [0..S). LongRoPE: the cos/sin tables are initializers
    stacked [short; long] (runtime/rope.py stacked_tables, M = max_length rows each); rows M + p are used
    when total_sequence_length > original_max_position_embeddings, as onnxruntime-genai's own builder
    switches its caches (an If on the mask width). The keys already cached keep their short-factor
    rotation: onnxruntime-genai has no way to recompute the cache at the crossing (tests/test_genai_export.py
    measures what that changes). The layer loop is export/decoder_graph.py's `decoder_layers`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from phi3v_edge.models.config import Phi3VConfig
from phi3v_edge.runtime import bundle as fmt
from phi3v_edge.runtime.model_facts import CROP_SIZE as CROP
from phi3v_edge.runtime.model_facts import MERGED_GRID as GRID
from phi3v_edge.runtime.model_facts import TOKENS_PER_CROP
from phi3v_edge.runtime.rope import stacked_tables

from .decoder_graph import DecoderOptions, _embedding, decoder_layers, final_logits, rotary_attention
from .graph_builder import GraphBuilder, onnx_dtype
from .vision_graph import build_vision

VISION_FILE = fmt.VISION_FILE  # build_vision writes it (and vision.onnx.data, named inside the graph)
EMBEDDING_FILE, TEXT_FILE = "embedding.onnx", "text.onnx"
# graph I/O names (genai_config.json repeats them)
PIXEL_VALUES, IMAGE_SIZES, IMAGE_FEATURES = "pixel_values", "image_sizes", "image_features"
INPUT_IDS, INPUTS_EMBEDS, ATTENTION_MASK, LOGITS = "input_ids", "inputs_embeds", "attention_mask", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
BATCH, SEQ, TOTAL, MAX_LEN = "batch_size", "sequence_length", "total_sequence_length", "max_length"


def rope_section(cfg: Phi3VConfig) -> dict:
    """The rope description runtime/rope.py reads (the same fields as a bundle manifest's `rope`)."""
    return {"type": cfg.rope_type, "theta": cfg.rope_theta,
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings,
            "short_factor": cfg.rope_short_factor, "long_factor": cfg.rope_long_factor}


def scalar(gb: GraphBuilder, value: int, prefix: str) -> str:
    """A 0-d int64 constant (gb.const stores arrays of ndim >= 1; Range and the layout maths need scalars)."""
    key = ("scalar", prefix, int(value))
    if key not in gb._consts:
        t = helper.make_tensor(gb.unique(f"{prefix}/scalar"), TensorProto.INT64, [], [int(value)])
        gb._consts[key] = gb.node("Constant", [], name=f"{prefix}/scalar_{int(value)}", value=t)
    return gb._consts[key]


# ---- vision ------------------------------------------------------------------------------------------
def layout_prelude(gb: GraphBuilder, pixel_values: str, image_sizes: str, crops_out: str, index_out: str) -> None:
    """Nodes: pixel_values [N, K, 3, 336, 336], image_sizes [N, 2] -> crops_out [C, 3, 336, 336] (each image's
    1 + rows * cols valid crops, images in index order) and index_out [T] (runtime/image_layout.layout_index of
    those grids, computed per token). Every node and value name starts with "genai/"."""
    i64 = np.int64
    c = lambda v: gb.const(np.asarray(v, i64), name="genai/const") if np.ndim(v) else scalar(gb, v, "genai")
    n = lambda op, ins, nm, **kw: gb.node(op, ins, name=f"genai/{nm}", **kw)
    # valid crops: slot j of image i is valid when j < 1 + rows_i * cols_i
    rows = n("Div", [n("Gather", [image_sizes, c(0)], "h", axis=1), c(CROP)], "rows")  # [N]
    cols = n("Div", [n("Gather", [image_sizes, c(1)], "w", axis=1), c(CROP)], "cols")
    ncrops = n("Add", [n("Mul", [rows, cols], "tiles"), c(1)], "ncrops")
    slots = n("Gather", [n("Shape", [pixel_values], "pv_shape"), c(1)], "slots")
    valid = n("Less", [n("Range", [c(0), slots, c(1)], "slot_range"),
                       n("Unsqueeze", [ncrops, c([1])], "ncrops_col")], "valid")  # [N, K]
    flat = n("Reshape", [valid, c([-1])], "valid_flat")
    crop_idx = n("Reshape", [n("NonZero", [flat], "crop_nz"), c([-1])], "crop_idx")  # [C] row-major
    pv_flat = n("Reshape", [pixel_values, c([-1, 3, CROP, CROP])], "pv_flat")
    gb.node("Gather", [pv_flat, crop_idx], outputs=[crops_out], name="genai/crops", axis=0)
    # tokens per image, their ranges, the crop number of each image's global view
    ntok = n("Add", [n("Add", [n("Mul", [ncrops, c(TOKENS_PER_CROP)], "crop_tokens"), c(1)], "plus_glb"),
                     n("Mul", [n("Add", [rows, c(1)], "rows1"), c(GRID)], "seps")], "ntok")  # [N]
    end = n("CumSum", [ntok, c(0)], "end")
    start = n("Sub", [end, ntok], "start")
    base = n("Sub", [n("CumSum", [ncrops, c(0)], "crop_end"), ncrops], "base")  # first crop of each image
    total_crops = n("ReduceSum", [ncrops, c([0])], "total_crops", keepdims=0)
    sub = n("Mul", [total_crops, c(TOKENS_PER_CROP)], "sub_row")  # table row of sub_GN
    glb = n("Add", [sub, c(1)], "glb_row")  # table row of glb_GN
    t = n("Range", [c(0), n("ReduceSum", [ntok, c([0])], "num_tokens", keepdims=0), c(1)], "t")  # [T]
    # image of token t: how many images end at or before t
    after = n("GreaterOrEqual", [n("Unsqueeze", [t, c([1])], "t_col"), n("Unsqueeze", [end, c([0])], "end_row")],
              "after")  # [T, N]
    img = n("ReduceSum", [n("Cast", [after], "after_int", to=TensorProto.INT64), c([1])], "img", keepdims=0)
    p = n("Sub", [t, n("Gather", [start, img], "t_start")], "p")  # position within the image's tokens
    r = n("Gather", [rows, img], "t_rows")
    k = n("Gather", [cols, img], "t_cols")
    b = n("Gather", [base, img], "t_base")
    width = n("Add", [n("Mul", [k, c(GRID)], "sub_cols"), c(1)], "sub_width")  # 12 cols + separator
    sub_len = n("Mul", [n("Mul", [r, c(GRID)], "sub_lines"), width], "sub_len")
    # sub-image grid: line L, column q; q == 12 cols is sub_GN
    L = n("Div", [p, width], "L")
    q = n("Mod", [p, width], "q")
    tile = n("Add", [n("Add", [b, c(1)], "b1"), n("Add", [n("Mul", [n("Div", [L, c(GRID)], "L12"), k], "tile_row"),
                                                       n("Div", [q, c(GRID)], "q12")], "tile_off")], "tile")
    tile_tok = n("Add", [n("Mul", [tile, c(TOKENS_PER_CROP)], "tile_base"),
                         n("Add", [n("Mul", [n("Mod", [L, c(GRID)], "Lm"), c(GRID)], "Lm12"),
                                   n("Mod", [q, c(GRID)], "qm")], "in_tile")], "tile_tok")
    sub_part = n("Where", [n("Equal", [q, n("Mul", [k, c(GRID)], "sep_col")], "is_sub_sep"), sub, tile_tok], "sub_part")
    # global view after glb_GN: 12 lines of 13 (12 tokens then sub_GN)
    g = n("Sub", [n("Sub", [p, sub_len], "g1"), c(1)], "g")
    gl, gc = n("Div", [g, c(GRID + 1)], "gl"), n("Mod", [g, c(GRID + 1)], "gc")
    glob_tok = n("Add", [n("Mul", [b, c(TOKENS_PER_CROP)], "glob_base"),
                         n("Add", [n("Mul", [gl, c(GRID)], "gl12"), gc], "glob_off")], "glob_tok")
    glob_part = n("Where", [n("Equal", [gc, c(GRID)], "is_glob_sep"), sub, glob_tok], "glob_part")
    rest = n("Where", [n("Equal", [p, sub_len], "is_glb"), glb, glob_part], "rest")
    gb.node("Where", [n("Less", [p, sub_len], "in_sub"), sub_part, rest], outputs=[index_out],
            name="genai/layout_index")


def build_genai_vision(reader, cfg: Phi3VConfig, out_dir: str | Path, *, precision: str, io_dtype: str,
                       block_size: int = 32, accuracy_level: int = 0,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """vision.onnx (+ .data) for onnxruntime-genai: export/vision_graph.py's graph (streamed from the
    checkpoint), then its inputs replaced by the prelude that takes (pixel_values, image_sizes)."""
    out_dir = Path(out_dir)
    section = build_vision(reader, cfg, out_dir, precision=precision, io_dtype=io_dtype, block_size=block_size,
                           accuracy_level=accuracy_level, progress=progress)
    path = out_dir / fmt.VISION_FILE
    model = onnx.load(str(path), load_external_data=False)  # the weights stay in vision.onnx.data as they are
    g = model.graph
    io_type = onnx_dtype(io_dtype)
    crops, index = "genai/crops_in", "genai/layout_index_in"
    for node in g.node:  # the old inputs now come from the prelude
        node.input[:] = [crops if x == fmt.PIXEL_VALUES else index if x == fmt.LAYOUT_INDEX else x for x in node.input]
    pre_dir = out_dir / ".prelude"
    pb = GraphBuilder(pre_dir / "prelude.onnx", name="prelude", inline_threshold=1 << 30)
    try:
        pv = pb.input(PIXEL_VALUES, io_type, ["num_images", "max_crops", 3, CROP, CROP])
        sizes = pb.input(IMAGE_SIZES, TensorProto.INT64, ["num_images", 2])
        layout_prelude(pb, pv, sizes, crops, index)
    finally:
        pb.close()
        pb.data_path.unlink(missing_ok=True)
        pre_dir.rmdir()
    nodes = list(pb.nodes) + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(pb.initializers)
    del g.input[:]
    g.input.extend(pb.inputs)
    g.name = "phi3v_genai_vision"
    path.write_bytes(model.SerializeToString())
    section = dict(section, file=VISION_FILE,
                   inputs={PIXEL_VALUES: [None, None, 3, CROP, CROP], IMAGE_SIZES: [None, 2]})
    return section


# ---- embedding ---------------------------------------------------------------------------------------
def image_order(gb: GraphBuilder, ids: str, feats: str) -> str:
    """image_features rows (image index order) -> the same rows in prompt order (the k-th negative id in
    the flattened input_ids gets row k). Image k's rows: start_k = tokens of images 1..k-1, then in order."""
    i64 = np.int64
    c = lambda v: gb.const(np.asarray(v, i64), name="emb/const") if np.ndim(v) else scalar(gb, v, "emb")
    n = lambda op, ins, nm, **kw: gb.node(op, ins, name=f"emb/{nm}", **kw)
    flat = n("Reshape", [ids, c([-1])], "ids_flat")
    where = n("Reshape", [n("NonZero", [n("Less", [flat, c(0)], "neg")], "neg_nz"), c([-1])], "neg_pos")  # [P]
    k = n("Neg", [n("Gather", [flat, where], "neg_ids")], "image_no")  # [P] image numbers 1..N
    kmax = n("ReduceMax", [n("Concat", [c([0]), k], "k0", axis=0), c([0])], "kmax", keepdims=1)  # [1]
    onehot = n("Cast", [n("Equal", [n("Unsqueeze", [k, c([1])], "k_col"),
                                    n("Add", [n("Range", [c(0), n("Squeeze", [kmax, c([0])], "kmax_s"), c(1)],
                                                "k_range"), c(1)], "k_row")], "is_k")],
               "onehot", to=TensorProto.INT64)  # [P, N]
    count = n("ReduceSum", [onehot, c([0])], "count", keepdims=0)  # [N]
    start = n("CumSum", [count, c(0)], "start", exclusive=1)
    occ = n("ReduceSum", [n("Mul", [n("CumSum", [onehot, c(0)], "running"), onehot], "occ_k"), c([1])], "occ1",
            keepdims=0)
    row = n("Add", [n("ReduceSum", [n("Mul", [onehot, n("Unsqueeze", [start, c([0])], "start_row")], "start_k"),
                                    c([1])], "row_start", keepdims=0), n("Sub", [occ, c(1)], "occ")], "row")
    return n("Gather", [feats, row], "features_prompt_order", axis=0)


def build_genai_embedding(reader, cfg: Phi3VConfig, out_dir: str | Path, o: DecoderOptions) -> dict:
    """embedding.onnx: input_ids, image_features -> inputs_embeds."""
    gb = GraphBuilder(Path(out_dir) / EMBEDDING_FILE, name="phi3v_genai_embedding", io_dtype=o.io_dtype)
    try:
        ids = gb.input(INPUT_IDS, TensorProto.INT64, [BATCH, SEQ])
        feats = gb.input(IMAGE_FEATURES, gb.float_type, ["num_image_tokens", cfg.hidden_size])
        x = _embedding(gb, reader, cfg, o, ids, image_order(gb, ids, feats))
        gb.output(x, gb.float_type, [BATCH, SEQ, cfg.hidden_size], name=INPUTS_EMBEDS)
        gb.save()
    finally:
        gb.close()
    return {"file": EMBEDDING_FILE, "precision": o.embedding_precision, "io_dtype": o.io_dtype}


# ---- text --------------------------------------------------------------------------------------------
def build_genai_text(reader, cfg: Phi3VConfig, out_dir: str | Path, o: DecoderOptions, max_length: int,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """text.onnx: inputs_embeds, attention_mask, past -> logits (last position), present."""
    KV, hd, h = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    gb = GraphBuilder(Path(out_dir) / TEXT_FILE, name="phi3v_genai_text", io_dtype=o.io_dtype,
                      accuracy_level=o.accuracy_level)
    ft = gb.float_type
    i64 = np.int64
    try:
        x = gb.input(INPUTS_EMBEDS, ft, [BATCH, SEQ, h])
        mask = gb.input(ATTENTION_MASK, TensorProto.INT64, [BATCH, TOTAL])
        pasts = [(gb.input(PAST_KEY % i, ft, [BATCH, KV, MAX_LEN, hd]), gb.input(PAST_VALUE % i, ft, [BATCH, KV, MAX_LEN, hd]))
                 for i in range(cfg.num_hidden_layers)]
        # GroupQueryAttention's lengths and the rotary rows, from the mask
        lengths = gb.node("ReduceSum", [mask, gb.const([1], i64)], name="mask/lengths", keepdims=0)  # [B]
        seqlens = gb.node("Cast", [gb.node("Sub", [lengths, scalar(gb, 1, "text")], name="mask/last")],
                          name="mask/seqlens_k", to=TensorProto.INT32)
        width = gb.node("Gather", [gb.node("Shape", [mask], name="mask/Shape"), scalar(gb, 1, "text")], name="mask/width")
        total = gb.node("Cast", [width], name="mask/total_sequence_length", to=TensorProto.INT32)
        s = gb.node("Gather", [gb.node("Shape", [x], name="embeds/Shape"), scalar(gb, 1, "text")], name="embeds/S")
        first = gb.node("Unsqueeze", [gb.node("Sub", [lengths, s], name="pos/first"), gb.const([1], i64)],
                        name="pos/first_col")  # [B, 1]: position of each row's first new token
        pos = gb.node("Add", [first, gb.node("Range", [scalar(gb, 0, "text"), s, scalar(gb, 1, "text")], name="pos/range")],
                      name="pos/position_ids")  # [B, S]
        rope = rope_section(cfg)
        cos_t, sin_t = stacked_tables(rope, hd, max_length, dtype=o.np_io)  # [2M, hd/2]
        cos, sin = gb.initializer("cos_cache", cos_t), gb.initializer("sin_cache", sin_t)
        if rope["type"]:  # long factors (rows M + p) once the sequence is longer than original_max_position_embeddings
            long = gb.node("Greater", [width, scalar(gb, cfg.original_max_position_embeddings, "text")], name="rope/long")
            offset = gb.node("Where", [long, scalar(gb, max_length, "text"), scalar(gb, 0, "text")], name="rope/offset")
            pos = gb.node("Add", [pos, offset], name="rope/rows")

        def attention(gb: GraphBuilder, i: int, qkv: str) -> str:
            return rotary_attention(gb, cfg, i, qkv, pos, cos, sin, pasts[i], seqlens, total,
                                    (PRESENT_KEY % i, PRESENT_VALUE % i))

        y, r = decoder_layers(gb, reader, cfg, o, x, attention, progress)
        logits = final_logits(gb, reader, cfg, o, y, r, last_only=True)
        gb.output(logits, ft, [BATCH, 1, cfg.vocab_size], name=LOGITS)
        for i in range(cfg.num_hidden_layers):
            gb.output(PRESENT_KEY % i, ft, [BATCH, KV, MAX_LEN, hd])
            gb.output(PRESENT_VALUE % i, ft, [BATCH, KV, MAX_LEN, hd])
        gb.save()
    finally:
        gb.close()
    return {"file": TEXT_FILE, "precision": o.precision, "io_dtype": o.io_dtype, "block_size": o.block_size,
            "symmetric": o.symmetric, "lm_head_precision": o.lm_head_precision,
            "accuracy_level": o.accuracy_level, "max_length": max_length, "weight_bytes": gb.external_bytes}
