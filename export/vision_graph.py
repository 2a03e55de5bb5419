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

Weights are read one tensor at a time (CheckpointReader.get) and streamed into `vision.onnx.data`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..models.config import NUM_IMG_TOKENS_PER_CROP, Phi3VConfig
from ..runtime.bundle import IMAGE_FEATURES, LAYOUT_INDEX, PIXEL_VALUES, VISION_FILE

PREFIX = "model.vision_embed_tokens."
CLIP = PREFIX + "img_processor.vision_model."
PRECISIONS = ("fp32", "fp16", "int8")
IO_DTYPES = ("float32", "float16")
OPSET = 17  # LayerNormalization
MS_OPSET = 1  # com.microsoft: MultiHeadAttention, QuickGelu, Gelu, MatMulNBits
QUICK_GELU_ALPHA = 1.702


class VisionExportError(ValueError):
    """A vision export request that cannot be honoured (precision, block size, shapes)."""


def build_vision(reader, cfg: Phi3VConfig, out_dir: str | Path, *, precision: str = "fp32",
                 io_dtype: str | None = None, block_size: int = 32,
                 progress: Callable[[int, int, str], Any] | None = None) -> dict[str, Any]:
    """Write vision.onnx (+ vision.onnx.data) into out_dir from the checkpoint tensors under
    `model.vision_embed_tokens.`; returns the manifest's `vision` section.

    reader: a CheckpointReader (anything with .get(name, dtype=..., shape=...) -> torch.Tensor).
    precision: fp32 | fp16 | int8 (MatMulNBits, 8 bits, `block_size`, symmetric).
    io_dtype: float32 | float16 of pixel_values and image_features; default float16 for fp16, else float32.
    progress: called as progress(done, total, what) after each encoder layer."""
    if precision not in PRECISIONS:
        raise VisionExportError(f"vision precision {precision!r} is not supported (use one of {', '.join(PRECISIONS)})")
    if io_dtype is None:
        io_dtype = "float16" if precision == "fp16" else "float32"
    if io_dtype not in IO_DTYPES:
        raise VisionExportError(f"vision io_dtype {io_dtype!r} is not supported (use float32 or float16)")
    compute = {"fp32": "float32", "fp16": "float16", "int8": io_dtype}[precision]
    vc = cfg.vision
    D, H = vc.hidden_size, vc.num_attention_heads
    merged, hidden = cfg.merged_dim, cfg.hidden_size
    used_layers = vc.num_hidden_layers + cfg.layer_idx + 1  # hidden_states[-2]: all layers but the last
    if used_layers < 0:
        raise VisionExportError(f"CLIP has {vc.num_hidden_layers} layers; layer_idx {cfg.layer_idx} needs more")
    if precision == "int8":
        for name, k in (("CLIP hidden size", D), ("CLIP intermediate size", vc.intermediate_size),
                        ("merged image feature size", merged), ("hidden size", hidden)):
            if block_size <= 0 or k % block_size:
                raise VisionExportError(f"int8 vision: {name} {k} is not divisible by block size {block_size}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_name = VISION_FILE + ".data"
    g = _Graph(out_dir / VISION_FILE, data_name, dtype=compute)
    f32 = torch.float32

    def w(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return reader.get(name, dtype=f32, shape=shape)

    def linear(x: str, prefix: str, k: int, n: int, quantize: bool, out: str | None = None) -> str:
        """x [..., k] @ W.T + b with W = `{prefix}.weight` [n, k], b = `{prefix}.bias` [n]."""
        return g.linear(x, w(prefix + ".weight", (n, k)), w(prefix + ".bias", (n,)), name=_short(prefix),
                        bits=8 if quantize else None, block_size=block_size, out=out)

    quant = precision == "int8"
    px = g.input(PIXEL_VALUES, io_dtype, ["num_crops", vc.num_channels, vc.image_size, vc.image_size])
    idx = g.input(LAYOUT_INDEX, "int64", ["num_image_tokens"])
    if io_dtype != compute:
        px = g.cast(px, compute)

    # ---- embeddings: Conv (no bias) -> tokens, class token via a zero pad row + [577, D] table --------------
    side, p = vc.num_patches_per_side, vc.patch_size
    conv_w = g.weight("vision.patch_embedding.weight", w(CLIP + "embeddings.patch_embedding.weight",
                                                          (D, vc.num_channels, p, p)))
    x = g.node("Conv", [px, conv_w], kernel_shape=[p, p], strides=[p, p], name="patch_embedding")  # [C, D, 24, 24]
    x = g.node("Reshape", [x, g.const_i64([0, D, side * side])])  # [C, D, 576]
    x = g.node("Transpose", [x], perm=[0, 2, 1])  # [C, 576, D]
    x = g.node("Pad", [x, g.const_i64([0, 1, 0, 0, 0, 0])])  # [C, 577, D], row 0 zero
    pos = w(CLIP + "embeddings.position_embedding.weight", (side * side + 1, D)).clone()
    pos[0] += w(CLIP + "embeddings.class_embedding", (D,))
    x = g.node("Add", [x, g.weight("vision.position_embedding", pos)])  # [C, 577, D]
    x = _layer_norm(g, w, x, CLIP + "pre_layrnorm", D, vc.layer_norm_eps)

    # ---- CLIP encoder layers 0 .. L-2 ------------------------------------------------------------------
    act = "QuickGelu" if vc.hidden_act == "quick_gelu" else "Gelu"
    for i in range(used_layers):
        lp = f"{CLIP}encoder.layers.{i}."
        h = _layer_norm(g, w, x, lp + "layer_norm1", D, vc.layer_norm_eps)
        qkv_w = torch.cat([w(f"{lp}self_attn.{n}_proj.weight", (D, D)) for n in "qkv"])  # [3D, D]
        qkv_b = torch.cat([w(f"{lp}self_attn.{n}_proj.bias", (D,)) for n in "qkv"])  # [3D]
        qkv = g.linear(h, qkv_w, qkv_b, name=f"vision.layers.{i}.self_attn.qkv_proj",
                       bits=8 if quant else None, block_size=block_size)  # [C, 577, 3D]
        q, k, v = g.node("Split", [qkv, g.const_i64([D, D, D])], axis=2, outputs=3)
        a = g.node("MultiHeadAttention", [q, k, v], domain="com.microsoft", num_heads=H,
                   name=f"vision.layers.{i}.self_attn")  # [C, 577, D], scale 1/sqrt(head_dim)
        a = linear(a, lp + "self_attn.out_proj", D, D, quant)
        x = g.node("Add", [x, a])
        h = _layer_norm(g, w, x, lp + "layer_norm2", D, vc.layer_norm_eps)
        h = linear(h, lp + "mlp.fc1", D, vc.intermediate_size, quant)
        h = (g.node("QuickGelu", [h], domain="com.microsoft", alpha=QUICK_GELU_ALPHA) if act == "QuickGelu"
             else g.node("Gelu", [h], domain="com.microsoft"))
        h = linear(h, lp + "mlp.fc2", vc.intermediate_size, D, quant)
        x = g.node("Add", [x, h])
        if progress:
            progress(i + 1, used_layers, f"vision layer {i + 1}/{used_layers}")

    # ---- drop CLS, 2x2 merge: [C, 577, D] -> [C*144, 4D] -----------------------------------------------
    x = g.node("Slice", [x, g.const_i64([1]), g.const_i64([side * side + 1]), g.const_i64([1])])  # [C, 576, D]
    half = side // 2
    x = g.node("Reshape", [x, g.const_i64([-1, half, 2, half, 2, D])])  # [C, i, r, j, c, D]
    x = g.node("Transpose", [x], perm=[0, 1, 3, 2, 4, 5])  # [C, i, j, r, c, D]
    x = g.node("Reshape", [x, g.const_i64([-1, 4 * D])])  # [C*144, 4D]

    # ---- separators as 2 extra rows, projector, layout gather ------------------------------------------
    seps = torch.cat([w(PREFIX + "sub_GN", (1, 1, 1, merged)).reshape(1, merged),
                      w(PREFIX + "glb_GN", (1, 1, merged)).reshape(1, merged)])  # [2, 4D]: row C*144 sub, C*144+1 glb
    x = g.node("Concat", [x, g.weight("vision.separators", seps)], axis=0)  # [C*144 + 2, 4D]
    x = linear(x, PREFIX + "img_projection.0", merged, hidden, quant)
    x = g.node("Gelu", [x], domain="com.microsoft")  # exact (erf) GELU, nn.GELU()
    x = linear(x, PREFIX + "img_projection.2", hidden, hidden, quant)  # [C*144 + 2, hidden]
    if io_dtype != compute:
        x = g.node("Gather", [x, idx], axis=0)
        g.cast(x, io_dtype, out=IMAGE_FEATURES)
    else:
        g.node("Gather", [x, idx], axis=0, out=IMAGE_FEATURES)
    g.output(IMAGE_FEATURES, io_dtype, ["num_image_tokens", hidden])
    files = g.save()

    section = {
        "file": VISION_FILE,
        "data_file": data_name,
        "files": files,
        "precision": precision,
        "io_dtype": io_dtype,
        "compute_dtype": compute,
        "num_layers": used_layers,  # CLIP layers in the graph (the last one is never needed)
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
        section.update(bits=8, block_size=block_size, symmetric=True)
    return section


def _short(prefix: str) -> str:
    """checkpoint name -> graph name: model.vision_embed_tokens.img_processor.vision_model.encoder.layers.3.mlp.fc1
    -> vision.layers.3.mlp.fc1; img_projection.0 -> vision.img_projection.0"""
    s = prefix.replace(CLIP + "encoder.", "vision.").replace(CLIP, "vision.").replace(PREFIX, "vision.")
    return s


def _layer_norm(g, w, x: str, prefix: str, d: int, eps: float) -> str:
    name = _short(prefix)
    scale = g.weight(name + ".weight", w(prefix + ".weight", (d,)))
    bias = g.weight(name + ".bias", w(prefix + ".bias", (d,)))
    return g.node("LayerNormalization", [x, scale, bias], axis=-1, epsilon=float(eps), name=name)


# ---- a minimal streaming ONNX builder (to be replaced by export/graph_builder.py) ----------------------------
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
_ONNX = {"float32": 1, "float16": 10, "int64": 7}  # TensorProto.FLOAT, FLOAT16, INT64


class _Graph:
    """Nodes and initializers; weights are appended to one external-data file as they arrive."""

    ALIGN, PAGE = 64, 4096

    def __init__(self, path: Path, data_name: str, dtype: str):
        import onnx

        self.onnx = onnx
        self.path, self.data_name, self.dtype = Path(path), data_name, dtype
        self.data = open(self.path.parent / data_name, "wb")
        self.offset = 0
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.count = 0

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{op}_{self.count}"

    def input(self, name: str, dtype: str, shape) -> str:
        self.inputs.append(self.onnx.helper.make_tensor_value_info(name, _ONNX[dtype], shape))
        return name

    def output(self, name: str, dtype: str, shape) -> None:
        self.outputs.append(self.onnx.helper.make_tensor_value_info(name, _ONNX[dtype], shape))

    def node(self, op: str, inputs, *, domain: str = "", name: str | None = None, out: str | None = None,
             outputs: int = 1, **attrs):
        name = name or self._name(op)
        if self.count and name in self._names():
            name = self._name(name)
        outs = [out] if out else [f"{name}/out{k}" if outputs > 1 else f"{name}/out" for k in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def _names(self):
        return {n.name for n in self.nodes}

    def cast(self, x: str, dtype: str, out: str | None = None) -> str:
        return self.node("Cast", [x], to=_ONNX[dtype], out=out)

    def const_i64(self, values) -> str:
        name = self._name("const")
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def raw(self, name: str, arr: np.ndarray) -> str:
        """An initializer with exactly this array (dtype kept), streamed to the data file."""
        arr = np.ascontiguousarray(arr)
        t = self.onnx.TensorProto()
        t.name = name
        t.data_type = self.onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        align = self.PAGE if arr.nbytes >= (1 << 20) else self.ALIGN
        pad = -self.offset % align
        self.data.write(b"\0" * pad)
        self.offset += pad
        self.data.write(arr.tobytes())
        t.data_location = self.onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += arr.nbytes
        self.inits.append(t)
        return name

    def weight(self, name: str, t: torch.Tensor) -> str:
        """A float weight in the compute dtype."""
        return self.raw(name, t.detach().to(torch.float32).numpy().astype(_NP[self.dtype]))

    def linear(self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, *, name: str, bits: int | None = None,
               block_size: int = 32, out: str | None = None) -> str:
        """x [..., K] @ weight.T (+ bias); weight [N, K]. MatMul, or MatMulNBits when bits is set."""
        n, k = weight.shape
        if bits is None:
            y = self.node("MatMul", [x, self.weight(name + ".weight", weight.T)], name=name + "/MatMul",
                          out=None if bias is not None else out)
            if bias is None:
                return y
            return self.node("Add", [y, self.weight(name + ".bias", bias)], name=name + "/Add", out=out)
        from . import quantize

        q = quantize.quantize(weight, bits=bits, block_size=block_size, symmetric=True, scale_dtype=_NP[self.dtype])
        ins = [x, self.raw(name + ".qweight", q.packed), self.raw(name + ".scales", q.scales.reshape(-1))]
        if q.zero_points is not None:
            ins.append(self.raw(name + ".zero_points", q.zero_points))
        y = self.node("MatMulNBits", ins, domain="com.microsoft", name=name + "/MatMulNBits", K=k, N=n, bits=bits,
                      block_size=block_size, out=None if bias is not None else out)
        if bias is None:
            return y
        return self.node("Add", [y, self.weight(name + ".bias", bias)], name=name + "/Add", out=out)

    def save(self) -> list[str]:
        onnx = self.onnx
        self.data.close()
        graph = onnx.helper.make_graph(self.nodes, "phi3v_vision", self.inputs, self.outputs, self.inits)
        model = onnx.helper.make_model(graph, producer_name="phi3v-edge",
                                       opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                      onnx.helper.make_opsetid("com.microsoft", MS_OPSET)])
        model.ir_version = 10
        onnx.save(model, str(self.path))
        return [self.path.name, self.data_name]
