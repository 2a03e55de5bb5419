"""vision.onnx: valid HD crops -> image features laid out for the decoder, built from the weights.

    pixel_values  [C, 3, 336, 336]                     (io dtype) valid crops of all images, prompt order
    layout_index  [T] int64                            rows of the table below, in decoder order
      Conv 14x14/14 (no bias) -> [C, D, 24, 24] -> [C, 576, D]
      Pad one zero row in front, + table[577, D] (row 0 = class_embedding + pos[0], rows 1.. = pos[1:])
      pre_layrnorm
      CLIP layers 0 .. L-2 (hidden_states[-2]: the last layer is never built), each:
        x += out_proj(MultiHeadAttention(split(qkv_proj(LN1(x)))))     one fused attention op per layer
        x += fc2(quick_gelu(fc1(LN2(x))))                                com.microsoft.QuickGelu, alpha 1.702
      drop CLS -> [C, 576, D] -> 2x2 merge -> [C*144, 4D]  (crop-major, row-major within a crop; the 4D
        vector is r0c0 | r0c1 | r1c0 | r1c1 of each 2x2 block, as models/vision.py merge_2x2)
      Concat [sub_GN; glb_GN] as 2 extra rows -> [C*144 + 2, 4D]
      projector: Linear(4D -> hidden) + bias, Gelu (erf), Linear(hidden -> hidden) + bias   (per token)
      Gather(table, layout_index)
  -> image_features [T, hidden]                        (io dtype)

Precisions: fp32 (MatMul, fp32 everywhere), fp16 (MatMul, fp16 weights and activations), int8
(MatMulNBits 8-bit for the qkv/out_proj/fc1/fc2 linears and both projector linears; everything else
float in the compute dtype). The compute dtype is fp16 for fp16, and the io dtype for int8 (fp16 io
-> fp16 compute on CUDA, fp32 io -> fp32 compute on CPU). An io dtype different from the compute
dtype gets a Cast at the input and the output. Q, K and V are one fused MatMul (weights concatenated
[q; k; v]) split before the attention op.

Weights are read one tensor at a time (CheckpointReader.get) and streamed into `vision.onnx.data` by
export/graph_builder.py (ai.onnx opset 21 + com.microsoft); int8 packing is export/quantize.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..models.config import NUM_IMG_TOKENS_PER_CROP, Phi3VConfig
from ..runtime.bundle import IMAGE_FEATURES, LAYOUT_INDEX, PIXEL_VALUES, VISION_FILE
from .graph_builder import GraphBuilder, onnx_dtype
from .options import BLOCK_SIZES as SUPPORTED_BLOCK_SIZES
from .options import IO_DTYPES, ExportError, check_block_size, check_choice
from .options import VISION_PRECISIONS as PRECISIONS

PREFIX = "model.vision_embed_tokens."
CLIP = PREFIX + "img_processor.vision_model."
QUICK_GELU_ALPHA = 1.702


class VisionExportError(ExportError):
    """A vision export request that cannot be honoured (precision, block size, shapes)."""


def int8_block_size(cfg: Phi3VConfig, block_size: int) -> int:
    """The largest supported block size <= `block_size` that divides every int8 linear's input size
    (CLIP hidden and intermediate, merged feature, hidden): the decoder's block size where it fits."""
    vc = cfg.vision
    dims = (vc.hidden_size, vc.intermediate_size, cfg.merged_dim, cfg.hidden_size)
    for b in sorted(SUPPORTED_BLOCK_SIZES, reverse=True):
        if b <= block_size and all(k % b == 0 for k in dims):
            return b
    raise VisionExportError(f"int8 vision: no supported block size divides the linear sizes {dims}")


def build_vision(reader, cfg: Phi3VConfig, out_dir: str | Path, *, precision: str = "fp32",
                 io_dtype: str | None = None, block_size: int = 32, accuracy_level: int = 0,
                 progress: Callable[[int, int], Any] | None = None) -> dict[str, Any]:
    """Write vision.onnx (+ vision.onnx.data) into out_dir from the checkpoint tensors under
    `model.vision_embed_tokens.`; returns the manifest's `vision` section.

    reader: a CheckpointReader (anything with .get(name, dtype=..., shape=...) -> torch.Tensor).
    precision: fp32 | fp16 | int8 (MatMulNBits, 8 bits, `block_size`, symmetric round-to-nearest).
    io_dtype: float32 | float16 of pixel_values and image_features; default float16 for fp16, else float32.
    accuracy_level: MatMulNBits' CPU accuracy level (int8 only; 0 = exact fp32, see graph_builder.py).
    progress: called as progress(i, n) after each of the n encoder layers (i = 1..n)."""
    check_choice(precision, PRECISIONS, "vision precision", VisionExportError)  # the checks: export/options.py
    io_dtype = check_choice(io_dtype or ("float16" if precision == "fp16" else "float32"), IO_DTYPES,
                            "vision io_dtype", VisionExportError)
    compute = {"fp32": "float32", "fp16": "float16", "int8": io_dtype}[precision]
    vc = cfg.vision
    D, H = vc.hidden_size, vc.num_attention_heads
    merged, hidden = cfg.merged_dim, cfg.hidden_size
    used_layers = vc.num_hidden_layers + cfg.layer_idx + 1  # hidden_states[-2]: all layers but the last
    if used_layers < 0:
        raise VisionExportError(f"CLIP has {vc.num_hidden_layers} layers; layer_idx {cfg.layer_idx} needs more")
    quant = precision == "int8"
    if quant:
        check_block_size(block_size, {"CLIP hidden size": D, "CLIP intermediate size": vc.intermediate_size,
                                      "merged image feature size": merged, "hidden size": hidden},
                         "int8 vision: ", VisionExportError)

    out_dir = Path(out_dir)
    g = GraphBuilder(out_dir / VISION_FILE, name="phi3v_vision", io_dtype=compute, accuracy_level=accuracy_level)
    io_type = onnx_dtype(io_dtype)

    def w(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(reader.numpy(name, shape))

    def weight(name: str, t: torch.Tensor) -> str:  # a float weight in the compute dtype
        return g.initializer(name, t.numpy().astype(g.np_float))

    def linear(x: str, name: str, weight: torch.Tensor, bias: torch.Tensor) -> str:
        return g.linear(x, name, weight, bias, precision=precision, block_size=block_size, symmetric=True)

    def ckpt_linear(x: str, prefix: str, k: int, n: int) -> str:
        """x [..., k] @ W.T + b, W = `{prefix}.weight` [n, k] (nn.Linear layout), b = `{prefix}.bias` [n]."""
        return linear(x, _short(prefix), w(prefix + ".weight", (n, k)), w(prefix + ".bias", (n,)))

    def layer_norm(x: str, prefix: str) -> str:
        name = _short(prefix)
        scale, bias = weight(name + ".weight", w(prefix + ".weight", (D,))), weight(name + ".bias", w(prefix + ".bias", (D,)))
        return g.node("LayerNormalization", [x, scale, bias], name=name, axis=-1, epsilon=float(vc.layer_norm_eps))

    try:
        px = g.input(PIXEL_VALUES, io_type, ["num_crops", vc.num_channels, vc.image_size, vc.image_size])
        idx = g.input(LAYOUT_INDEX, onnx_dtype("int64"), ["num_image_tokens"])
        if io_dtype != compute:
            px = g.node("Cast", [px], to=g.float_type)

        # ---- embeddings: Conv (no bias) -> tokens; class token = a zero pad row + the [577, D] table --------
        side, p = vc.num_patches_per_side, vc.patch_size
        conv_w = weight("vision.patch_embedding.weight",
                        w(CLIP + "embeddings.patch_embedding.weight", (D, vc.num_channels, p, p)))
        x = g.node("Conv", [px, conv_w], name="vision.patch_embedding", kernel_shape=[p, p], strides=[p, p])  # [C, D, 24, 24]
        x = g.node("Reshape", [x, g.const([0, D, side * side], np.int64)])  # [C, D, 576]
        x = g.node("Transpose", [x], perm=[0, 2, 1])  # [C, 576, D]
        x = g.node("Pad", [x, g.const([0, 1, 0, 0, 0, 0], np.int64)])  # [C, 577, D], row 0 zero
        pos = w(CLIP + "embeddings.position_embedding.weight", (side * side + 1, D)).clone()
        pos[0] += w(CLIP + "embeddings.class_embedding", (D,))
        x = g.node("Add", [x, weight("vision.position_embedding", pos)])  # [C, 577, D]
        x = layer_norm(x, CLIP + "pre_layrnorm")

        # ---- CLIP encoder layers 0 .. L-2 --------------------------------------------------------------
        for i in range(used_layers):
            lp = f"{CLIP}encoder.layers.{i}."
            h = layer_norm(x, lp + "layer_norm1")
            qkv_w = torch.cat([w(f"{lp}self_attn.{n}_proj.weight", (D, D)) for n in "qkv"])  # [3D, D]
            qkv_b = torch.cat([w(f"{lp}self_attn.{n}_proj.bias", (D,)) for n in "qkv"])  # [3D]
            qkv = linear(h, f"vision.layers.{i}.self_attn.qkv_proj", qkv_w, qkv_b)  # [C, 577, 3D]
            q, k, v = g.node("Split", [qkv, g.const([D, D, D], np.int64)], outputs=3, axis=2)
            a = g.ms("MultiHeadAttention", [q, k, v], name=f"vision.layers.{i}.self_attn",
                     num_heads=H)  # [C, 577, D], full attention, scale 1/sqrt(head_dim)
            x = g.node("Add", [x, ckpt_linear(a, lp + "self_attn.out_proj", D, D)])
            h = layer_norm(x, lp + "layer_norm2")
            h = ckpt_linear(h, lp + "mlp.fc1", D, vc.intermediate_size)
            h = (g.ms("QuickGelu", [h], alpha=QUICK_GELU_ALPHA) if vc.hidden_act == "quick_gelu"
                 else g.ms("Gelu", [h]))
            x = g.node("Add", [x, ckpt_linear(h, lp + "mlp.fc2", vc.intermediate_size, D)])
            if progress:
                progress(i + 1, used_layers)

        # ---- drop CLS, 2x2 merge: [C, 577, D] -> [C*144, 4D] -------------------------------------------
        half = side // 2
        x = g.node("Slice", [x, g.const([1], np.int64), g.const([side * side + 1], np.int64),
                             g.const([1], np.int64)])  # [C, 576, D]
        x = g.node("Reshape", [x, g.const([-1, half, 2, half, 2, D], np.int64)])  # [C, i, r, j, c, D]
        x = g.node("Transpose", [x], perm=[0, 1, 3, 2, 4, 5])  # [C, i, j, r, c, D]
        x = g.node("Reshape", [x, g.const([-1, 4 * D], np.int64)])  # [C*144, 4D]

        # ---- separators as 2 extra rows (C*144: sub_GN, C*144+1: glb_GN), projector, layout gather -------
        seps = torch.cat([w(PREFIX + "sub_GN", (1, 1, 1, merged)).reshape(1, merged),
                          w(PREFIX + "glb_GN", (1, 1, merged)).reshape(1, merged)])  # [2, 4D]
        x = g.node("Concat", [x, weight("vision.separators", seps)], axis=0)  # [C*144 + 2, 4D]
        x = ckpt_linear(x, PREFIX + "img_projection.0", merged, hidden)
        x = g.ms("Gelu", [x])  # exact (erf) GELU, as nn.GELU()
        x = ckpt_linear(x, PREFIX + "img_projection.2", hidden, hidden)  # [C*144 + 2, hidden]
        if io_dtype != compute:
            x = g.node("Gather", [x, idx], axis=0)
            g.node("Cast", [x], outputs=[IMAGE_FEATURES], to=io_type)
        else:
            g.node("Gather", [x, idx], outputs=[IMAGE_FEATURES], axis=0)
        g.output(IMAGE_FEATURES, io_type, ["num_image_tokens", hidden])
        g.save()
    finally:
        g.close()

    data_file = g.data_path.name if g.data_path.exists() else None
    section = {
        "file": VISION_FILE,
        "data_file": data_file,
        "precision": precision,
        "io_dtype": io_dtype,
        "compute_dtype": compute,
        "num_layers": used_layers,  # CLIP layers in the graph (hidden_states[-2]: the last one is never needed)
        "clip_num_hidden_layers": vc.num_hidden_layers,
        "clip_hidden_size": D,
        "clip_num_heads": H,
        "merged_size": merged,
        "hidden_size": hidden,
        "crop_size": vc.image_size,
        "tokens_per_crop": NUM_IMG_TOKENS_PER_CROP,
        "attention": "com.microsoft.MultiHeadAttention",
        "inputs": {PIXEL_VALUES: [None, vc.num_channels, vc.image_size, vc.image_size], LAYOUT_INDEX: [None]},
        "outputs": {IMAGE_FEATURES: [None, hidden]},
    }
    if quant:
        section.update(bits=8, block_size=block_size, symmetric=True, accuracy_level=accuracy_level)
    return section


def _short(prefix: str) -> str:
    """checkpoint name -> graph name: model.vision_embed_tokens.img_processor.vision_model.encoder.layers.3.mlp.fc1
    -> vision.layers.3.mlp.fc1; img_projection.0 -> vision.img_projection.0"""
    s = prefix.replace(CLIP + "encoder.", "vision.").replace(CLIP, "vision.").replace(PREFIX, "vision.")
    return s

