"""vision.onnx against the PyTorch reference (CPU provider), on a tiny random checkpoint.

The checkpoint has 3 CLIP layers, so the graph holds 2 (hidden_states[-2]) and a wiring mistake
between layers shows. Pixel values and image sizes are made directly (no processor): only the valid
crops of each image are fed, with runtime/image_layout's layout_index.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

from phi3v_edge.export import quantize as quant_module
from phi3v_edge.export.vision_graph import VisionExportError, build_vision
from phi3v_edge.models.checkpoint import CheckpointReader
from phi3v_edge.models.config import Phi3VConfig
from phi3v_edge.models.modeling import Phi3VForCausalLM
from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint
from phi3v_edge.runtime.bundle import IMAGE_FEATURES, LAYOUT_INDEX, PIXEL_VALUES, VISION_FILE
from phi3v_edge.runtime.image_layout import layout_index, num_image_tokens, valid_crops

CLIP_PREFIX = "model.vision_embed_tokens.img_processor."
CLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_config(vision_layers=3)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vision_ckpt"), cfg)


@pytest.fixture(scope="module")
def cfg(ckpt):
    return Phi3VConfig.from_json(ckpt)


@pytest.fixture(scope="module")
def reference(ckpt):
    return Phi3VForCausalLM.from_pretrained(ckpt).model.vision_embed_tokens


def _build(ckpt, cfg, out_dir, **kw):
    steps = []
    section = build_vision(CheckpointReader(ckpt), cfg, out_dir, progress=lambda *a: steps.append(a), **kw)
    return section, steps


@pytest.fixture(scope="module")
def fp32_graph(ckpt, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_fp32")
    section, steps = _build(ckpt, cfg, out)
    return out, section, steps


def session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_graph(sess, pixel_values, image_sizes, order=None, dtype=np.float32):
    crops, grids = valid_crops(pixel_values.numpy(), image_sizes.numpy(), order)
    idx = layout_index(grids)
    out = sess.run([IMAGE_FEATURES], {PIXEL_VALUES: crops.astype(dtype), LAYOUT_INDEX: idx})[0]
    return out, crops.shape[0]


def reference_features(ref, pixel_values, image_sizes, order=None):
    with torch.no_grad():
        per_image = ref(pixel_values, image_sizes)
    order = range(len(per_image)) if order is None else order
    return torch.cat([per_image[i] for i in order]).numpy()


def make_inputs(grids, num_crops=4, seed=0):
    """Random pixel_values [N, num_crops+1, 3, 336, 336] (padding crops random too: they must not be
    read) and image_sizes [N, 2] for these (rows, cols) grids."""
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(len(grids), num_crops + 1, 3, 336, 336, generator=g)
    sizes = torch.tensor([[336 * r, 336 * c] for r, c in grids])
    return pv, sizes


@pytest.mark.parametrize("grids,order", [
    ([(1, 1)], None),
    ([(2, 1)], None),
    ([(1, 3)], None),
    ([(1, 2), (2, 2)], [1, 0]),  # two images, different grids, prompt order not storage order
], ids=["1x1", "2x1", "1x3", "two_images"])
def test_fp32_matches_reference(fp32_graph, reference, grids, order):
    out_dir, _, _ = fp32_graph
    pv, sizes = make_inputs(grids, seed=len(grids) * 10 + grids[0][1])
    got, fed = run_graph(session(out_dir / VISION_FILE), pv, sizes, order)
    want = reference_features(reference, pv, sizes, order)
    assert fed == sum(1 + r * c for r, c in grids)
    assert got.shape == want.shape == (sum(num_image_tokens(r, c) for r, c in grids), reference.cfg.hidden_size)
    assert rel_l2(got, want) < 1e-4


def test_fp32_num_crops_16_feeds_only_valid_crops(fp32_graph, reference):
    """A 336x336 image at num_crops 16 encodes 2 crops, not 17; a 2x3 grid beside it encodes 7."""
    out_dir, _, _ = fp32_graph
    pv, sizes = make_inputs([(1, 1), (2, 3)], num_crops=16, seed=16)
    sess = session(out_dir / VISION_FILE)
    got, fed = run_graph(sess, pv[:1], sizes[:1])
    assert fed == 2
    assert rel_l2(got, reference_features(reference, pv[:1], sizes[:1])) < 1e-4
    got, fed = run_graph(sess, pv, sizes)
    assert fed == 2 + 7
    assert rel_l2(got, reference_features(reference, pv, sizes)) < 1e-4


def test_graph_structure_and_manifest(fp32_graph, cfg):
    out_dir, section, steps = fp32_graph
    onnx.checker.check_model(str(out_dir / VISION_FILE), full_check=True)
    model = onnx.load(str(out_dir / VISION_FILE), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    used = cfg.vision.num_hidden_layers - 1
    assert used == 2
    assert ops["MultiHeadAttention"] == used
    assert all(n.domain == "com.microsoft" for n in model.graph.node if n.op_type == "MultiHeadAttention")
    assert "Softmax" not in ops
    assert ops["LayerNormalization"] == 1 + 2 * used and ops["QuickGelu"] == used and ops["Gelu"] == 1
    assert ops["MatMul"] == 4 * used + 2  # qkv (fused), out_proj, fc1, fc2 per layer; 2 projector linears
    assert ops["Conv"] == 1 and ops["Gather"] == 1
    assert [i.name for i in model.graph.input] == [PIXEL_VALUES, LAYOUT_INDEX]
    assert [o.name for o in model.graph.output] == [IMAGE_FEATURES]
    # every weight but the tiny ones (<= 1 KiB: shapes, small biases) lives in the external data file
    ext = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all(len(t.raw_data) <= 1024 for t in model.graph.initializer if t not in ext)
    assert sorted(p.name for p in out_dir.iterdir()) == [VISION_FILE, VISION_FILE + ".data"]
    assert section["file"] == VISION_FILE and section["data_file"] == VISION_FILE + ".data"
    assert section["precision"] == "fp32" and section["io_dtype"] == "float32"
    assert section["num_layers"] == used and section["tokens_per_crop"] == 144
    assert section["clip_hidden_size"] == cfg.vision.hidden_size and section["hidden_size"] == cfg.hidden_size
    assert section["merged_size"] == 4 * cfg.vision.hidden_size
    assert [s[:2] for s in steps] == [(i + 1, used) for i in range(used)]


def test_fp16_graph(ckpt, cfg, reference, tmp_path):
    section, _ = _build(ckpt, cfg, tmp_path, precision="fp16")
    assert section["io_dtype"] == "float16" and section["precision"] == "fp16"
    path = tmp_path / VISION_FILE
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MultiHeadAttention"] == cfg.vision.num_hidden_layers - 1 and "Softmax" not in ops
    assert all(t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64) for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # ORT's CPU provider runs it (casting where it lacks fp16 kernels): fp16 noise only
    pv, sizes = make_inputs([(1, 2)], seed=3)
    got, _ = run_graph(session(path), pv, sizes, dtype=np.float16)
    assert got.dtype == np.float16
    assert rel_l2(got, reference_features(reference, pv, sizes)) < 5e-3


def test_fp32_weights_with_fp16_io(ckpt, cfg, reference, tmp_path):
    section, _ = _build(ckpt, cfg, tmp_path, precision="fp32", io_dtype="float16")
    assert section["io_dtype"] == "float16" and section["compute_dtype"] == "float32"
    pv, sizes = make_inputs([(1, 1)], seed=4)
    pv = pv.half().float()  # the fp16 input is the only rounding
    got, _ = run_graph(session(tmp_path / VISION_FILE), pv, sizes, dtype=np.float16)
    assert got.dtype == np.float16
    assert rel_l2(got, reference_features(reference, pv, sizes)) < 2e-3


def _dequantized_reference(ckpt, cfg, block_size):
    """The reference with every linear that the int8 graph quantizes replaced by the dequantized weight."""
    quantize = quant_module
    ref = Phi3VForCausalLM.from_pretrained(ckpt).model.vision_embed_tokens
    layers = ref.img_processor.vision_model.encoder.layers[: cfg.vision.num_hidden_layers - 1]
    mods = [layer.get_submodule(n) for layer in layers for n in CLIP_LINEARS]
    mods += [ref.img_projection[0], ref.img_projection[2]]
    with torch.no_grad():
        for m in mods:
            q = quantize.quantize(m.weight, bits=8, block_size=block_size, symmetric=True)
            m.weight.copy_(torch.from_numpy(quantize.dequantize(q)))
    return ref


def test_int8_matches_dequantized_reference(ckpt, cfg, reference, tmp_path):
    section, _ = _build(ckpt, cfg, tmp_path, precision="int8", block_size=32)
    assert section["bits"] == 8 and section["block_size"] == 32 and section["symmetric"] is True
    path = tmp_path / VISION_FILE
    onnx.checker.check_model(str(path), full_check=True)
    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    used = cfg.vision.num_hidden_layers - 1
    assert ops["MatMulNBits"] == 4 * used + 2 and "MatMul" not in ops and "Softmax" not in ops
    pv, sizes = make_inputs([(2, 1)], seed=8)
    got, _ = run_graph(session(path), pv, sizes)
    deq = _dequantized_reference(ckpt, cfg, 32)
    assert rel_l2(got, reference_features(deq, pv, sizes)) < 1e-4  # same effective weights: packing and scales exact
    assert rel_l2(got, reference_features(reference, pv, sizes)) < 5e-2  # and close to the float model


def test_int8_fp16_io(ckpt, cfg, tmp_path):
    """int8 weights with fp16 activations (the CUDA configuration; fp16 scales)."""
    section, _ = _build(ckpt, cfg, tmp_path, precision="int8", io_dtype="float16")
    assert section["compute_dtype"] == "float16"
    path = tmp_path / VISION_FILE
    onnx.checker.check_model(str(path), full_check=True)
    pv, sizes = make_inputs([(1, 1)], seed=9)
    got, _ = run_graph(session(path), pv, sizes, dtype=np.float16)
    assert got.dtype == np.float16
    assert rel_l2(got, reference_features(_dequantized_reference(ckpt, cfg, 32), pv, sizes)) < 5e-3


def test_bad_requests(ckpt, cfg, tmp_path):
    reader = CheckpointReader(ckpt)
    with pytest.raises(VisionExportError, match="precision 'int4'"):
        build_vision(reader, cfg, tmp_path, precision="int4")
    with pytest.raises(VisionExportError, match="io_dtype"):
        build_vision(reader, cfg, tmp_path, io_dtype="bfloat16")
    with pytest.raises(VisionExportError, match="CLIP hidden size = 32 .* not divisible by the block size 64"):  # CLIP hidden 32
        build_vision(reader, cfg, tmp_path, precision="int8", block_size=64)


def test_reference_tower_matches_transformers_clip(ckpt, cfg, reference):
    """Independent oracle for the reference itself: transformers' CLIPVisionModel, hidden_states[-2]."""
    vc = cfg.vision
    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads, num_channels=vc.num_channels, image_size=vc.image_size,
        patch_size=vc.patch_size, hidden_act=vc.hidden_act, layer_norm_eps=vc.layer_norm_eps)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.CLIPVisionModel(hf_cfg).eval()
    reader = CheckpointReader(ckpt)
    sd = {k[len(CLIP_PREFIX):]: reader.get(k, dtype=torch.float32) for k in reader.keys() if k.startswith(CLIP_PREFIX)}
    if not any(k.startswith("vision_model.") for k in hf.state_dict()):  # transformers 5 drops the wrapper
        sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m]
    pv = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(pixel_values=pv, output_hidden_states=True).hidden_states[-2]
        got = reference.img_processor.vision_model.penultimate(pv)
    assert got.shape == want.shape == (2, vc.num_patches_per_side ** 2 + 1, vc.hidden_size)
    assert rel_l2(got.numpy(), want.numpy()) < 1e-5
