"""The runtime on ONNX Runtime's CUDA provider (skipped without CUDA): CUDA-graph decode equals plain decode
token for token, fp32 on the GPU equals the CPU, LongRoPE crossing under graph replay, sampling and streaming.

Tiny random checkpoints; the int4 bundle has fp16 activations (the CUDA target)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gpu

N = 64
TEXT = "<|user|>\nWrite a short story about a lighthouse keeper.<|end|>\n<|assistant|>\n"
ONE = "<|user|>\n<|image_1|>\nWhat is in this picture?<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    from phi3v_edge.export.bundle import export_bundle

    d = tmp_path_factory.mktemp("gpu_bundles")
    return {"int4": export_bundle(tiny_checkpoint, d / "int4", precision="int4", target="cuda"),
            "fp32": export_bundle(tiny_checkpoint, d / "fp32", precision="fp32", target="cuda")}


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))


def make(bundle, **kw):
    from phi3v_edge.runtime import Phi3VRuntime

    return Phi3VRuntime(bundle, provider="cuda", max_length=2048, **kw)


def test_sessions_and_buffers_are_on_the_gpu(bundles):
    rt = make(bundles["int4"])
    assert rt.cuda_graph is True
    assert rt.decoder.session.get_providers()[0] == "CUDAExecutionProvider"
    assert rt.vision.session.get_providers()[0] == "CUDAExecutionProvider"
    dec = rt.decoder
    assert dec.cache.buffers[0].device_name().lower() == "cuda" and dec.logits.value.device_name().lower() == "cuda"
    assert dec.cache.dtype == np.float16
    r = rt.generate(TEXT, max_new_tokens=8, stop_ids=())
    assert len(r.token_ids) == 8 and r.timings["tokens_per_s"] > 0


def test_cuda_graph_decode_equals_plain_decode(bundles, image):
    graph, plain = make(bundles["int4"]), make(bundles["int4"], cuda_graph=False)
    for prompt, imgs in [(TEXT, []), (ONE, [image]), (TEXT, [])]:  # the last run replays a graph captured earlier
        a = graph.generate(prompt, imgs, max_new_tokens=N, stop_ids=())
        b = plain.generate(prompt, imgs, max_new_tokens=N, stop_ids=())
        assert a.token_ids == b.token_ids
    # chat on the graph runtime: subsequent-prompt prefill between replays
    t1 = [{"role": "user", "content": "Describe it.", "images": [image]}]
    r1 = graph.chat(t1, max_new_tokens=16, stop_ids=())
    msgs = t1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "More detail."}]
    r2 = graph.chat(msgs, max_new_tokens=N, stop_ids=())
    prompt, imgs = graph.build_prompt(msgs)
    assert r2.cached_tokens > 0
    assert r2.token_ids == plain.generate(prompt, imgs, max_new_tokens=N, stop_ids=()).token_ids


def test_fp32_bundle_on_gpu_equals_cpu(bundles, image):
    from phi3v_edge.runtime import Phi3VRuntime

    gpu = make(bundles["fp32"])
    cpu = Phi3VRuntime(bundles["fp32"], provider="cpu", max_length=2048)
    for prompt, imgs in [(TEXT, []), (ONE, [image])]:
        assert gpu.generate(prompt, imgs, max_new_tokens=N, stop_ids=()).token_ids == \
            cpu.generate(prompt, imgs, max_new_tokens=N, stop_ids=()).token_ids


def test_longrope_crossing_under_graph_replay(tmp_path_factory):
    """At the crossing the row's position_ids move to the long half of the stacked tables: the captured graph
    must pick them up (they are a fixed device buffer written before each replay)."""
    from phi3v_edge.export.bundle import export_bundle
    from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint

    d = tmp_path_factory.mktemp("gpu_lr")
    ckpt = write_tiny_checkpoint(d / "ckpt", tiny_config(original_max_position_embeddings=48), seed=2)
    b = export_bundle(ckpt, d / "int4", precision="int4", target="cuda")
    graph, plain = make(b), make(b, cuda_graph=False)
    prompt = "<|user|>\nTell me everything about lighthouses.<|end|>\n<|assistant|>\n"
    n = graph.count_tokens(prompt)
    assert n <= 48 < n + N
    before = graph.stats()["long_recomputes"]
    a = graph.generate(prompt, max_new_tokens=N, stop_ids=())
    assert graph.stats()["long_recomputes"] == before + 1
    assert a.token_ids == plain.generate(prompt, max_new_tokens=N, stop_ids=()).token_ids
    # the next request goes back to the short tables and still matches
    assert graph.generate(prompt, max_new_tokens=N, stop_ids=()).token_ids == a.token_ids


def test_sampling_and_stream_on_gpu(bundles):
    rt = make(bundles["int4"])
    kw = dict(max_new_tokens=32, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=11, stop_ids=())
    a = rt.generate(TEXT, **kw)
    assert rt.generate(TEXT, **kw).token_ids == a.token_ids
    greedy = rt.generate(TEXT, max_new_tokens=32, stop_ids=())
    assert "".join(rt.stream(TEXT, max_new_tokens=32, stop_ids=())) == greedy.text
    s = rt.stream(TEXT, max_new_tokens=32, stop_ids=())
    next(s)
    s.close()
    assert rt.generate(TEXT, max_new_tokens=32, stop_ids=()).token_ids == greedy.token_ids


def test_batched_graph_replay_equals_plain_rows(bundles, image):
    """Rows of different lengths in one bucket (1, 2 and 4 rows: one CUDA graph each) give the tokens they give
    without graphs, one at a time."""
    from phi3v_edge.runtime.engine import Engine

    plain = make(bundles["int4"], cuda_graph=False)
    reqs = [(TEXT, []), (ONE, [image]), ("<|user|>\nHi<|end|>\n<|assistant|>\n", [])]
    want = [plain.generate(p, i, max_new_tokens=N, stop_ids=()).token_ids for p, i in reqs]
    eng = Engine(bundles["int4"], provider="cuda", max_batch=4, max_length=2048)
    try:
        for k in (1, 2, 3):  # buckets 1, 2 and 4
            hs = [eng.submit(p, i, max_new_tokens=N, stop_ids=(), reuse_prefix=False) for p, i in reqs[:k]]
            assert [h.result(timeout=120).token_ids for h in hs] == want[:k]
    finally:
        eng.shutdown(drain_timeout=5)
