"""decoder.onnx (export/decoder_graph.py) against the PyTorch reference, run with onnxruntime (CPU) directly.

One tiny checkpoint (hidden 128, 4 heads over 2 KV heads, 2 layers, LongRoPE boundary at 330 positions) so
that a one-image prompt stays on the short side, a two-image prompt is on the long side, and decoding
crosses the boundary. The ORT side binds one buffer per layer as both past and present (the runtime's scheme).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from phi3v_edge.export.decoder_graph import build_decoder, dequantized_state_dict, resolve_options
from phi3v_edge.export.graph_builder import GraphBuilder
from phi3v_edge.models.checkpoint import CheckpointReader
from phi3v_edge.models.decoder import KVCache
from phi3v_edge.models.modeling import Phi3VForCausalLM
from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint
from phi3v_edge.runtime import bundle as fmt
from phi3v_edge.runtime.rope import needs_long, stacked_tables, table_rows

ORIG = 330  # original_max_position_embeddings of the test model
M = 1024  # KV buffer length


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256, num_layers=2,
                      original_max_position_embeddings=ORIG)
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("dec_ckpt"), cfg, seed=3)
    return path, cfg


@pytest.fixture(scope="module")
def reference(ckpt):
    path, _ = ckpt
    torch.manual_seed(0)
    return Phi3VForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def prompts(ckpt, reference):
    """Token ids with image placeholders and the reference's own image features (prompt order)."""
    _, cfg = ckpt
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 3, 336, 336, generator=g)  # 2 images, up to 2 crops + global
    image_sizes = torch.tensor([[336, 336], [336, 672]])  # 313 and 457 tokens
    with torch.no_grad():
        feats = reference.model.vision_embed_tokens(pixel_values, image_sizes)
    rng = np.random.default_rng(2)
    text = lambda n: list(rng.integers(3, cfg.vocab_size, n))  # noqa: E731
    n1, n2 = feats[0].shape[0], feats[1].shape[0]
    one = [1] + text(5) + [-1] * n1 + text(6)  # 325 tokens: short factors
    two = [1] + text(3) + [-1] * n1 + [1] + text(2) + [-2] * n2 + text(4)  # long factors
    return {
        "text": (np.array([[1] + text(11)]), None, None),
        "text_long": (np.array([[1] + text(325)]), None, None),  # crosses the boundary while decoding
        "one_image": (np.array([one]), pixel_values[:1], image_sizes[:1]),
        "two_images": (np.array([two]), pixel_values, image_sizes),
        "features": [f.float().numpy() for f in feats],
    }


_GRAPHS: dict = {}


def _build(ckpt, tmp_path_factory, **opts):
    key = tuple(sorted(opts.items()))
    if key not in _GRAPHS:
        path, cfg = ckpt
        out = tmp_path_factory.mktemp("dec")
        manifest = build_decoder(CheckpointReader(path), cfg, out, **opts)
        _GRAPHS[key] = (out, manifest)
    return _GRAPHS[key]


# ---- helpers: the two sides ----------------------------------------------------------------------------
def _rope(cfg):
    return {"type": cfg.rope_type, "theta": cfg.rope_theta,
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings,
            "short_factor": cfg.rope_short_factor, "long_factor": cfg.rope_long_factor}


class OrtDecoder:
    """decoder.onnx through IOBinding: one preallocated buffer per layer bound as past AND present."""

    def __init__(self, onnx_path, cfg, io_dtype=np.float32, max_length=M, force_long: bool | None = None):
        self.s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.cfg, self.dt, self.M = cfg, np.dtype(io_dtype), max_length
        shape = (1, cfg.num_key_value_heads, max_length, cfg.head_dim)
        self.kv = [[ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dt)) for _ in range(2)]
                   for _ in range(cfg.num_hidden_layers)]
        self.cos, self.sin = stacked_tables(_rope(cfg), cfg.head_dim, max_length, self.dt)
        self.past, self.force_long = 0, force_long

    def step(self, ids: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        total = self.past + ids.shape[1]
        if features is None:
            features = np.zeros((0, self.cfg.hidden_size), self.dt)
        b = self.s.io_binding()
        b.bind_output(fmt.LOGITS)
        b.bind_cpu_input(fmt.INPUT_IDS, np.ascontiguousarray(ids, np.int64))
        b.bind_cpu_input(fmt.IMAGE_FEATURES, np.ascontiguousarray(features, self.dt))
        for i, (k, v) in enumerate(self.kv):
            (pk, pv), (ok, ov) = fmt.past_names(i), fmt.present_names(i)
            b.bind_ortvalue_input(pk, k)
            b.bind_ortvalue_input(pv, v)
            b.bind_ortvalue_output(ok, k)
            b.bind_ortvalue_output(ov, v)
        b.bind_cpu_input(fmt.SEQLENS_K, np.array([total - 1], np.int32))
        b.bind_cpu_input(fmt.TOTAL_SEQ_LEN, np.array(total, np.int32))
        long = needs_long(_rope(self.cfg), total) if self.force_long is None else self.force_long
        b.bind_cpu_input(fmt.POSITION_IDS, table_rows(np.arange(self.past, total)[None], long, self.M))
        b.bind_cpu_input(fmt.COS_CACHE, self.cos)
        b.bind_cpu_input(fmt.SIN_CACHE, self.sin)
        self.s.run_with_iobinding(b)
        self.past = total
        return b.get_outputs()[0].numpy().astype(np.float32)


class RefDecoder:
    """The PyTorch reference with its KV cache; the factor set is picked by total length (its own rule)."""

    def __init__(self, model):
        self.m, self.cache = model, KVCache(model.config.num_hidden_layers)

    @torch.no_grad()
    def embed(self, ids, pixel_values=None, image_sizes=None):
        return self.m.embed(torch.as_tensor(ids), pixel_values, image_sizes)

    @torch.no_grad()
    def step(self, embeds, last_only=True):
        head = self.m.lm_head
        if last_only:  # the logits of the last position only (the vocab projection of every position is slow)
            self.m.lm_head = _LastOnly(head)
        try:
            return self.m(inputs_embeds=embeds, cache=self.cache).logits.float().numpy()
        finally:
            self.m.lm_head = head


class _LastOnly(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x[:, -1:])


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _features(prompts, ids):
    """All image features of a prompt in prompt order (image k's rows at its -k placeholders)."""
    ks = [k for k in dict.fromkeys((-ids[ids < 0]).tolist())]
    return np.concatenate([prompts["features"][k - 1] for k in ks]) if ks else None


def _run_both(ort_dec, ref_dec, prompts, name, decode_steps, tol, chunks=None, last_only=True):
    """Prefill (in chunks if given: subsequent prompts after a non-empty past, an image may straddle two
    chunks), then greedy decode steps; relative L2 of the logits of every call below tol."""
    ids, pv, sizes = prompts[name]
    feats = _features(prompts, ids)
    emb = ref_dec.embed(ids, pv, sizes)
    errs = []
    start, used = 0, 0
    for c in chunks or [ids.shape[1]]:
        part = ids[:, start:start + c]
        n_img = int((part < 0).sum())
        y = ort_dec.step(part, feats[used:used + n_img] if n_img else None)
        r = ref_dec.step(emb[:, start:start + c], last_only)
        errs.append(_rel(y, r))
        start, used = start + c, used + n_img
    assert start == ids.shape[1]
    tok = int(np.argmax(y[0, -1]))
    for _ in range(decode_steps):
        y = ort_dec.step(np.array([[tok]]))
        r = ref_dec.step(ref_dec.embed(np.array([[tok]])))
        errs.append(_rel(y, r))
        tok = int(np.argmax(r[0, -1]))
    assert max(errs) < tol, f"{name}: relative L2 errors per call {errs}"
    print(f"{name}: max relative L2 {max(errs):.2e} over {len(errs)} calls")
    return errs


# ---- fp32: equal to the reference --------------------------------------------------------------------
def test_fp32_text_short_and_across_longrope_boundary(ckpt, reference, prompts, tmp_path_factory):
    out, man = _build(ckpt, tmp_path_factory, precision="fp32")
    cfg = ckpt[1]
    _run_both(OrtDecoder(out / fmt.DECODER_FILE, cfg), RefDecoder(reference), prompts, "text", 4, 1e-4)
    # prompt of 326: short; decode steps at totals 327..334 cross 330 -> long tables beyond (as the reference)
    ort_dec = OrtDecoder(out / fmt.DECODER_FILE, cfg)
    _run_both(ort_dec, RefDecoder(reference), prompts, "text_long", 8, 1e-4)
    assert ort_dec.past > ORIG
    # the boundary is really exercised: short tables beyond it give other logits
    with pytest.raises(AssertionError, match="relative L2"):
        _run_both(OrtDecoder(out / fmt.DECODER_FILE, cfg, force_long=False), RefDecoder(reference), prompts,
                  "text_long", 8, 1e-3)
    assert man["all_logits"] is False and man["precision"] == "fp32" and man["io_dtype"] == "float32"


def test_fp32_images_prefill_chunks_and_decode(ckpt, reference, prompts, tmp_path_factory):
    out, _ = _build(ckpt, tmp_path_factory, precision="fp32")
    cfg = ckpt[1]
    # one image: 325 tokens (short), decode crosses the boundary
    _run_both(OrtDecoder(out / fmt.DECODER_FILE, cfg), RefDecoder(reference), prompts, "one_image", 7, 1e-4)
    # two images: long side from the first call
    _run_both(OrtDecoder(out / fmt.DECODER_FILE, cfg), RefDecoder(reference), prompts, "two_images", 2, 1e-4)
    # ... and prefilled in 3 chunks (subsequent prompts after a non-empty past; image 2 split in two)
    ids = prompts["two_images"][0]
    cut = int(np.argmax(ids[0] == -2)) + 100
    _run_both(OrtDecoder(out / fmt.DECODER_FILE, cfg), RefDecoder(reference), prompts, "two_images", 2, 1e-4,
              chunks=[cut - 120, 120, ids.shape[1] - cut])


def test_fp32_batched_decode_step_equals_rows_alone(ckpt, prompts, tmp_path_factory):
    """One decode step over 3 rows of different lengths, one of them under the long LongRoPE factors, gives
    every row the logits of its own batch-1 step (rows are independent: seqlens_k and position_ids per row)."""
    out, _ = _build(ckpt, tmp_path_factory, precision="fp32")
    cfg = ckpt[1]
    rows = []
    for name in ("text", "one_image", "two_images"):  # 12, 325 (short) and 786 (long) tokens
        ids = prompts[name][0]
        dec = OrtDecoder(out / fmt.DECODER_FILE, cfg)
        y = dec.step(ids, _features(prompts, ids))
        rows.append((dec, int(np.argmax(y[0, -1]))))
    assert [needs_long(_rope(cfg), d.past + 1) for d, _ in rows] == [False, False, True]
    # the batched step: each row's KV copied into a [3, ...] buffer, then one run
    B = len(rows)
    kv = [[ort.OrtValue.ortvalue_from_numpy(np.concatenate([d.kv[i][j].numpy() for d, _ in rows]))
           for j in range(2)] for i in range(cfg.num_hidden_layers)]
    solo = [d.step(np.array([[t]]))[0, -1] for d, t in rows]  # the rows alone (their own buffers advance)
    s = rows[0][0].s
    b = s.io_binding()
    b.bind_output(fmt.LOGITS)
    b.bind_cpu_input(fmt.INPUT_IDS, np.array([[t] for _, t in rows], np.int64))
    b.bind_cpu_input(fmt.IMAGE_FEATURES, np.zeros((0, cfg.hidden_size), np.float32))
    for i, (k, v) in enumerate(kv):
        (pk, pv), (ok, ov) = fmt.past_names(i), fmt.present_names(i)
        b.bind_ortvalue_input(pk, k)
        b.bind_ortvalue_input(pv, v)
        b.bind_ortvalue_output(ok, k)
        b.bind_ortvalue_output(ov, v)
    totals = [d.past for d, _ in rows]  # after the step
    b.bind_cpu_input(fmt.SEQLENS_K, np.array([t - 1 for t in totals], np.int32))
    b.bind_cpu_input(fmt.TOTAL_SEQ_LEN, np.array(max(totals), np.int32))
    b.bind_cpu_input(fmt.POSITION_IDS, np.stack([table_rows([t - 1], needs_long(_rope(cfg), t), M) for t in totals]))
    b.bind_cpu_input(fmt.COS_CACHE, rows[0][0].cos)
    b.bind_cpu_input(fmt.SIN_CACHE, rows[0][0].sin)
    s.run_with_iobinding(b)
    batched = b.get_outputs()[0].numpy()
    assert batched.shape == (B, 1, cfg.vocab_size)
    for r in range(B):
        assert _rel(batched[r, 0], solo[r]) < 1e-5, r
    # the new rows were written into each row's own slot at its own position
    for i in range(cfg.num_hidden_layers):
        for r, (d, _) in enumerate(rows):
            np.testing.assert_allclose(kv[i][0].numpy()[r, :, : d.past], d.kv[i][0].numpy()[0, :, : d.past],
                                       rtol=1e-5, atol=1e-6)


def test_fp32_all_logits(ckpt, reference, prompts, tmp_path_factory):
    out, man = _build(ckpt, tmp_path_factory, precision="fp32", all_logits=True)
    assert man["all_logits"] is True
    _run_both(OrtDecoder(out / fmt.DECODER_FILE, ckpt[1]), RefDecoder(reference), prompts, "one_image", 2, 1e-4,
              last_only=False)


# ---- quantized: equal to the reference holding the same dequantized weights ------------------------
QUANT = [
    dict(precision="int8", io_dtype="float32", block_size=32),
    dict(precision="int4", io_dtype="float32", block_size=32),
    dict(precision="int4", io_dtype="float32", block_size=128, symmetric=False),
    dict(precision="int4", io_dtype="float32", block_size=64, embedding_precision="int8", lm_head_precision="fp16"),
]


@pytest.mark.parametrize("opts", QUANT, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_quantized_equals_dequantized_reference(ckpt, prompts, opts, tmp_path_factory):
    path, cfg = ckpt
    out, man = _build(ckpt, tmp_path_factory, **opts)
    model = Phi3VForCausalLM.from_pretrained(path)
    sd = dequantized_state_dict(CheckpointReader(path), cfg, **opts)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("model.vision_embed_tokens.") for k in missing)
    _run_both(OrtDecoder(out / fmt.DECODER_FILE, cfg), RefDecoder(model), prompts, "one_image", 3, 1e-3)
    # the quantization is real: the original weights give different logits
    assert not torch.equal(sd["lm_head.weight"] if opts.get("lm_head_precision") != "fp16" else
                           sd["model.layers.0.mlp.down_proj.weight"],
                           CheckpointReader(path).get("model.layers.0.mlp.down_proj.weight" if opts.get(
                               "lm_head_precision") == "fp16" else "lm_head.weight", dtype=torch.float32))
    assert man["block_size"] == opts["block_size"] and man["symmetric"] == opts.get("symmetric", True)
    # graph inspection: one MatMulNBits per quantized projection, one GQA per layer, no Softmax / float MatMul
    g = onnx.load(str(out / fmt.DECODER_FILE), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    n_layers = cfg.num_hidden_layers
    lm_q = man["lm_head_precision"] in ("int4", "int8")
    assert ops.count("MatMulNBits") == 4 * n_layers + lm_q
    assert ops.count("MatMul") == (0 if lm_q else 1)
    assert ops.count("GroupQueryAttention") == n_layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layers
    assert "Softmax" not in ops
    bits = {a.i for n in g.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4 if opts["precision"] == "int4" else 8}


def test_fp16_io_close_to_reference(ckpt, reference, prompts, tmp_path_factory):
    """fp16 activations (the CUDA configuration) run on CPU too; within fp16 noise of the fp32 reference."""
    path, cfg = ckpt
    out, man = _build(ckpt, tmp_path_factory, precision="int4")
    assert man["io_dtype"] == "float16" and man["embedding_precision"] == "fp16" and man["lm_head_precision"] == "int4"
    model = Phi3VForCausalLM.from_pretrained(path)
    model.load_state_dict(dequantized_state_dict(CheckpointReader(path), cfg, precision="int4"), strict=False)
    _run_both(OrtDecoder(out / fmt.DECODER_FILE, cfg, np.float16), RefDecoder(model), prompts, "one_image", 2, 2e-2)


def test_graph_io_contract(ckpt, tmp_path_factory):
    out, man = _build(ckpt, tmp_path_factory, precision="fp32")
    cfg = ckpt[1]
    s = ort.InferenceSession(str(out / fmt.DECODER_FILE), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in s.get_inputs()}
    outs = {o.name: o for o in s.get_outputs()}
    kv = ["batch", cfg.num_key_value_heads, "max_length", cfg.head_dim]
    assert ins[fmt.INPUT_IDS].shape == ins[fmt.POSITION_IDS].shape == ["batch", "S"]
    assert ins[fmt.INPUT_IDS].type == ins[fmt.POSITION_IDS].type == "tensor(int64)"
    assert ins[fmt.IMAGE_FEATURES].shape == ["T", cfg.hidden_size]
    assert ins[fmt.SEQLENS_K].type == ins[fmt.TOTAL_SEQ_LEN].type == "tensor(int32)"
    assert ins[fmt.SEQLENS_K].shape == ["batch"]
    assert ins[fmt.COS_CACHE].shape == ["rope_rows", cfg.head_dim // 2]
    assert outs[fmt.LOGITS].shape == ["batch", 1, cfg.vocab_size]
    for i in range(cfg.num_hidden_layers):
        for n in fmt.past_names(i):
            assert ins[n].shape == kv
        for n in fmt.present_names(i):
            assert outs[n].shape == kv
    assert sorted(p.name for p in out.iterdir()) == sorted(man["files"]) == ["decoder.onnx", "decoder.onnx.data"]
    for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
        assert k in man
    g = onnx.load(str(out / fmt.DECODER_FILE), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("MatMul") == 4 * cfg.num_hidden_layers + 1 and "MatMulNBits" not in ops and "Softmax" not in ops


def test_progress_and_dequantized_keys(ckpt, tmp_path):
    path, cfg = ckpt
    calls = []
    build_decoder(CheckpointReader(path), cfg, tmp_path, precision="int8", io_dtype="float32",
                  progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i + 1, cfg.num_hidden_layers) for i in range(cfg.num_hidden_layers)]
    sd = dequantized_state_dict(CheckpointReader(path), cfg, precision="int8", io_dtype="float32")
    with torch.device("meta"):
        names = {k for k in dict(Phi3VForCausalLM(cfg).named_parameters()) if not k.startswith("model.vision_embed")}
    assert set(sd) == names


# ---- errors --------------------------------------------------------------------------------------------
def test_bad_options_raise_before_writing(ckpt, tmp_path):
    path, cfg = ckpt
    reader = CheckpointReader(path)
    with pytest.raises(ValueError, match="precision 'int3'"):
        build_decoder(reader, cfg, tmp_path / "a", precision="int3")
    with pytest.raises(ValueError, match="block size 48"):
        build_decoder(reader, cfg, tmp_path / "b", precision="int4", block_size=48)
    with pytest.raises(ValueError, match="embedding precision"):
        build_decoder(reader, cfg, tmp_path / "c", precision="int4", embedding_precision="int4")
    with pytest.raises(ValueError, match="io_dtype"):
        build_decoder(reader, cfg, tmp_path / "d", precision="fp32", io_dtype="bfloat16")
    odd = tiny_config(hidden_size=96, num_heads=6, intermediate_size=192)  # head_dim 16
    with pytest.raises(ValueError, match="not divisible by the block size 64"):
        resolve_options(odd, "int4", block_size=64)
    with pytest.raises(ValueError, match="not divisible by the block size 64"):
        build_decoder(reader, odd, tmp_path / "e", precision="int8", block_size=64)
    assert not any((tmp_path / d).exists() for d in "abcde")


def test_graph_builder_external_data(tmp_path):
    """Big initializers stream to one aligned .data file; small ones stay inline; the model runs."""
    gb = GraphBuilder(tmp_path / "m.onnx")
    x = gb.input("x", gb.float_type, ["B", 64])
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((320, 64)).astype(np.float32), rng.standard_normal((64, 320)).astype(np.float32)
    y = gb.linear(x, "fc1", w1, bias=np.ones(320, np.float32), precision="fp32")
    y = gb.linear(y, "fc2", w2, precision="int4", block_size=32)
    gb.output(y, gb.float_type, ["B", 64], name="y")
    gb.save()
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all(dict((e.key, e.value) for e in t.external_data)["location"] == "m.onnx.data" for t in ext)
    assert all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 64 == 0 for t in ext)
    xv = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
    from phi3v_edge.export.quantize import dequantize, quantize

    ref = (xv @ w1.T + 1.0) @ dequantize(quantize(w2, 4, 32)).T
    assert _rel(out, ref) < 1e-5


def test_checkpoint_mismatch_errors(ckpt, tmp_path):
    from phi3v_edge.models.checkpoint import CheckpointError

    path, _ = ckpt
    reader = CheckpointReader(path)
    wide = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=512, num_layers=2)
    with pytest.raises(CheckpointError, match=r"gate_up_proj.weight has shape \(512, 128\).*expects \(1024, 128\)"):
        build_decoder(reader, wide, tmp_path / "a", precision="int4", io_dtype="float32")
    deep = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256, num_layers=3)
    with pytest.raises(CheckpointError, match="model.layers.2.input_layernorm.weight is missing"):
        build_decoder(reader, deep, tmp_path / "b", precision="int4", io_dtype="float32")
