"""phi3v_edge.runtime (CPU provider) on tiny random bundles, against the PyTorch reference.

Two bundles: the shared tiny checkpoint (conftest `tiny_bundle`, fp32) for text / image / chat / sampling /
errors, and one with its LongRoPE boundary at 340 positions (4 heads over 2 KV heads) for the crossing.
Stop ids are disabled on both sides (stop_ids=()) so random weights run the full 64 tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_edge.runtime import BundleError, InputError, Phi3VRuntime, ProviderError
from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.sampler import Sampler, SamplingParams

N = 64  # new tokens in the parity tests
ORIG = 340  # original_max_position_embeddings of the LongRoPE test model
TEXT = "<|user|>\nWrite a short story about a lighthouse keeper.<|end|>\n<|assistant|>\n"
ONE = "<|user|>\n<|image_1|>\nWhat is in this picture?<|end|>\n<|assistant|>\n"
TWO = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare the two images.<|end|>\n<|assistant|>\n"


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The reference is a tiny model: one thread avoids oversubscription next to ONNX Runtime's pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return Phi3VRuntime(tiny_bundle, provider="cpu", max_length=2048)


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    from phi3v_edge.models.modeling import Phi3VForCausalLM

    return Phi3VForCausalLM.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("images")
    a = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))  # landscape
    b = Image.fromarray(rng.integers(0, 256, (700, 200, 3), dtype=np.uint8))  # portrait
    a.save(d / "a.png")
    b.save(d / "b.png")
    return {"a": a, "b": b, "a_path": str(d / "a.png"), "b_path": str(d / "b.png"), "dir": d}


def reference_tokens(ref, rt, prompt, imgs=(), n=N, num_crops=None):
    from phi3v_edge.models.processor import to_torch

    t = to_torch(rt.processor(prompt, list(imgs), num_crops))
    return ref.generate(t["input_ids"], t.get("pixel_values"), t.get("image_sizes"), max_new_tokens=n, stop_ids=())


@pytest.fixture(scope="module")
def baseline(rt, ref):
    """The text prompt's 64 greedy tokens, checked against the reference once; every recovery test compares
    against it."""
    r = rt.generate(TEXT, max_new_tokens=N, stop_ids=())
    assert r.token_ids == reference_tokens(ref, rt, TEXT)
    return r


def assert_usable(rt, baseline):
    r = rt.generate(TEXT, max_new_tokens=N, stop_ids=())
    assert r.token_ids == baseline.token_ids
    assert r.text == baseline.text


# ---- greedy parity with the reference ------------------------------------------------------------
def test_text_prompt_matches_reference(baseline):
    assert len(baseline.token_ids) == N and baseline.finish_reason == "length"
    assert baseline.text and isinstance(baseline.text, str)
    for k in ("preprocess", "vision", "prefill", "decode", "tokens_per_s", "ttft", "total"):
        assert k in baseline.timings and baseline.timings[k] >= 0
    assert baseline.timings["decode_steps"] == N - 1


def test_one_image_matches_reference(rt, ref, images):
    r = rt.generate(ONE, [images["a_path"]], max_new_tokens=N, stop_ids=())
    assert r.token_ids == reference_tokens(ref, rt, ONE, [images["a"]])
    assert r.prompt_tokens > 500 and r.timings["vision"] > 0


def test_two_images_match_reference(rt, ref, images):
    r = rt.generate(TWO, [images["a"], images["b"]], max_new_tokens=N, stop_ids=())
    assert r.token_ids == reference_tokens(ref, rt, TWO, [images["a"], images["b"]])


def test_placeholders_out_of_order_and_num_crops(rt, ref, images):
    """<|image_2|> before <|image_1|>: features must follow the prompt order, not the list order."""
    prompt = "<|user|>\n<|image_2|>\nthen\n<|image_1|>\nwhich is larger?<|end|>\n<|assistant|>\n"
    r = rt.generate(prompt, [images["a"], images["b"]], max_new_tokens=16, stop_ids=(), num_crops=2)
    assert r.token_ids == reference_tokens(ref, rt, prompt, [images["a"], images["b"]], n=16, num_crops=2)


# ---- LongRoPE ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lr(tmp_path_factory):
    from phi3v_edge.export.bundle import export_bundle
    from phi3v_edge.models.modeling import Phi3VForCausalLM
    from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint

    cfg = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
                      original_max_position_embeddings=ORIG)
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("lr_ckpt"), cfg, seed=5)
    bundle = export_bundle(ckpt, tmp_path_factory.mktemp("lr_bundle") / "fp32", precision="fp32", target="cpu")
    return {"rt": Phi3VRuntime(bundle, provider="cpu", max_length=1024),
            "always": Phi3VRuntime(bundle, provider="cpu", max_length=1024, long_rope="always"),
            "ref": Phi3VForCausalLM.from_pretrained(ckpt), "bundle": bundle}


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def long_text(n_words: int) -> str:
    return "<|user|>\n" + " ".join(WORDS[i % len(WORDS)] for i in range(n_words)) + "<|end|>\n<|assistant|>\n"


def counters_after(rt, fn):
    """The engine's counters that changed while fn() ran (prefills, prefill_tokens, long_recomputes, ...)."""
    before = rt.stats()
    out = fn()
    after = rt.stats()
    return out, {k: after[k] - before[k] for k in ("requests", "prefills", "prefill_tokens", "prefix_tokens_reused",
                                                    "decode_steps", "long_recomputes")}


@pytest.mark.parametrize("case", ["text", "image"])
def test_longrope_crossing_matches_reference(lr, images, case):
    rt, ref = lr["rt"], lr["ref"]
    if case == "text":
        prompt, imgs, crops = long_text(250), [], None
    else:
        prompt, imgs, crops = ONE, [Image.fromarray(np.asarray(images["a"])[:336, :336])], 1  # 313 image tokens
    n = rt.count_tokens(prompt, imgs, num_crops=crops)
    assert n <= ORIG < n + N, "the generation must cross the boundary"
    r, c = counters_after(rt, lambda: rt.generate(prompt, imgs, max_new_tokens=N, stop_ids=(), num_crops=crops))
    assert r.token_ids == reference_tokens(ref, rt, prompt, imgs, num_crops=crops)
    # one prompt prefill with the short tables, then one recompute of all ORIG + 1 tokens with the long ones
    assert c["long_recomputes"] == 1 and c["prefills"] == 2 and c["prefill_tokens"] == n + ORIG + 1
    assert c["decode_steps"] == N - 2  # every other token came from a batched decode step


def test_longrope_prompt_past_boundary_and_always_mode(lr):
    rt, always, ref = lr["rt"], lr["always"], lr["ref"]
    prompt = long_text(300)
    assert rt.count_tokens(prompt) > ORIG
    r = rt.generate(prompt, max_new_tokens=N, stop_ids=())
    assert r.token_ids == reference_tokens(ref, rt, prompt)
    assert always.generate(prompt, max_new_tokens=N, stop_ids=()).token_ids == r.token_ids
    # "always" never recomputes, even when the generation crosses the boundary
    short = long_text(250)
    a, c = counters_after(always, lambda: always.generate(short, max_new_tokens=N, stop_ids=()))
    assert c["prefills"] == 1 and c["long_recomputes"] == 0 and len(a.token_ids) == N


def test_chat_across_longrope_boundary(lr):
    """Turn 2 takes the conversation past the boundary: the short-table cache is rebuilt with the long tables."""
    rt = lr["rt"]
    turn1 = [{"role": "user", "content": " ".join(WORDS * 12)}]
    r1, c1 = counters_after(rt, lambda: rt.chat(turn1, max_new_tokens=8, stop_ids=()))
    assert r1.prompt_tokens + 8 <= ORIG and c1["long_recomputes"] == 0
    msgs = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": " ".join(WORDS * 8)}]
    r2 = rt.chat(msgs, max_new_tokens=16, stop_ids=())
    # the cached prefix was written with the short factors: nothing of it can serve a long-factor prompt
    assert r2.prompt_tokens > ORIG and r2.cached_tokens == 0
    prompt, _ = build_prompt(msgs)
    assert r2.token_ids == rt.generate(prompt, max_new_tokens=16, stop_ids=()).token_ids


# ---- chat ----------------------------------------------------------------------------------------
def test_two_turn_chat_equals_one_prompt(rt, images, monkeypatch):
    turn1 = [{"role": "user", "content": "Describe this image.", "images": [images["a_path"]]}]
    rt.reset()
    r1 = rt.chat(turn1, max_new_tokens=16, stop_ids=())
    msgs = turn1 + [{"role": "assistant", "content": r1.text},
                    {"role": "user", "content": "And this one?", "images": [images["b"]]}]
    r2 = rt.chat(msgs, max_new_tokens=N, stop_ids=())
    # the follow-up prefilled only what the cache did not hold: at least all of turn 1's prompt was reused
    assert r2.cached_tokens >= r1.prompt_tokens
    prompt, imgs = build_prompt(msgs)
    one = rt.generate(prompt, imgs, max_new_tokens=N, stop_ids=())
    assert one.cached_tokens == 0 and one.prompt_tokens == r2.prompt_tokens
    assert r2.token_ids == one.token_ids
    # the first image was not encoded again in turn 2: only image 2 went through vision.onnx
    calls = []
    vision = rt.engine.prepare.vision

    def spy(crops, layout):
        calls.append(len(crops))
        return vision(crops, layout)

    monkeypatch.setattr(rt.engine.prepare, "vision", spy)
    rt.reset()
    rt.chat(turn1, max_new_tokens=16, stop_ids=())
    r3 = rt.chat(msgs, max_new_tokens=N, stop_ids=())
    assert r3.token_ids == one.token_ids
    assert calls == [1 + 4, 1 + 3]  # 500x300 -> global + 2x2 tiles (turn 1); 200x700 -> global + 3x1 tiles (turn 2)


def test_chat_with_edited_history_reprefills(rt, images):
    rt.reset()
    rt.chat([{"role": "user", "content": "Hello!"}], max_new_tokens=8, stop_ids=())
    msgs = [{"role": "user", "content": "Goodbye!", "images": [images["a"]]}]
    r = rt.chat(msgs, max_new_tokens=16, stop_ids=())
    assert r.cached_tokens < 5  # only the shared "<s><|user|>..." head can be kept
    prompt, imgs = build_prompt(msgs)
    assert r.token_ids == rt.generate(prompt, imgs, max_new_tokens=16, stop_ids=()).token_ids


# ---- sampling ------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(rt):
    kw = dict(max_new_tokens=32, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, stop_ids=())
    a = rt.generate(TEXT, seed=123, **kw)
    b = rt.generate(TEXT, seed=123, **kw)
    c = rt.generate(TEXT, seed=124, **kw)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 32
    assert a.token_ids != c.token_ids
    # host path (repetition penalty) is reproducible too
    p = dict(kw, repetition_penalty=1.3, top_k=0)
    assert rt.generate(TEXT, seed=7, **p).token_ids == rt.generate(TEXT, seed=7, **p).token_ids


def test_sampling_with_tiny_top_p_is_greedy(rt, baseline):
    r = rt.generate(TEXT, max_new_tokens=N, do_sample=True, top_p=1e-6, seed=1, stop_ids=())
    assert r.token_ids == baseline.token_ids


def test_sampler_host_and_candidate_paths_agree():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32) * 3
    for k, p in [(40, 1.0), (20, 0.5), (1000, 0.9)]:  # host top-k == on-device TopK candidates
        params = SamplingParams(True, 0.7, k, p, 1.0, seed=9)
        host, cand = Sampler(params), Sampler(params)
        order = np.argsort(-logits, kind="stable")[:k]
        for _ in range(20):
            assert host(logits) == cand.pick(logits[order], order)
    for p in (1.0, 0.8, 0.3):  # no top-k: the partial-sort nucleus equals a naive full sort
        host, naive_rng = Sampler(SamplingParams(True, 0.7, 0, p, 1.0, seed=3)), np.random.default_rng(3)
        z = logits.astype(np.float64) / 0.7
        probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        order = np.argsort(-z, kind="stable") if p < 1 else np.arange(z.size)
        ps = probs[order]
        if p < 1:
            ps = np.where((np.cumsum(ps) - ps) < p, ps, 0.0)
        for _ in range(20):
            cdf = np.cumsum(ps)
            want = order[min(np.searchsorted(cdf, naive_rng.random() * cdf[-1], side="right"), z.size - 1)]
            assert host(logits) == want
    # top-k keeps only the k best; repetition penalty lowers repeated ids
    s = Sampler(SamplingParams(True, 1.0, 3, 1.0, 1.0, seed=0))
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert all(s(logits) in top3 for _ in range(50))
    best = int(np.argmax(logits))
    g = Sampler(SamplingParams(False, repetition_penalty=1e6))
    assert g(logits, history=[best]) != best


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0.0),
                                 dict(max_new_tokens=0), dict(seed="x"), dict(stop=[""])])
def test_bad_generation_settings(rt, baseline, bad):
    kw = dict(max_new_tokens=4, do_sample=True)
    kw.update(bad)
    with pytest.raises(InputError):
        rt.generate(TEXT, **kw)


# ---- streaming, stop strings ---------------------------------------------------------------------
def test_stream_deltas_join_to_text(rt, baseline):
    gen = rt.stream(TEXT, max_new_tokens=N, stop_ids=())
    deltas = []
    while True:
        try:
            deltas.append(next(gen))
        except StopIteration as e:
            result = e.value
            break
    assert all(deltas)
    assert "".join(deltas) == baseline.text
    assert result.token_ids == baseline.token_ids and rt.last_result is result


def test_stop_string_and_extra_stop_id(rt, baseline):
    text = baseline.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text[: text.find(stop)]
    r = rt.generate(TEXT, max_new_tokens=N, stop_ids=(), stop=[stop])
    assert r.finish_reason == "stop" and r.text == cut
    assert "".join(rt.stream(TEXT, max_new_tokens=N, stop_ids=(), stop=stop)) == cut
    # an extra stop id: generation ends right after its first occurrence (included last)
    tok = baseline.token_ids[5]
    first = baseline.token_ids.index(tok)
    r = rt.generate(TEXT, max_new_tokens=N, stop_ids=(), stop=tok)
    assert r.token_ids == baseline.token_ids[: first + 1] and r.finish_reason == "stop"
    # default stop ids: a stop token ends the generation and is not in the text
    r = rt.generate(TEXT, max_new_tokens=N, stop_ids=(baseline.token_ids[3],))
    assert r.finish_reason == "stop" and len(r.token_ids) <= 4


def test_cancelled_stream_frees_the_request(rt, baseline):
    s = rt.stream(TEXT, max_new_tokens=N, stop_ids=())
    next(s)
    next(s)
    s.close()
    assert_usable(rt, baseline)
    assert rt.stats()["running"] == 0 and rt.stats()["waiting"] == 0
    # an unfinished stream and a newer request: both complete, each with its own answer
    s = rt.stream(TEXT, max_new_tokens=N, stop_ids=())
    first = next(s)
    assert_usable(rt, baseline)
    assert first + "".join(s) == baseline.text
    # a chat stream closed half way leaves a consistent conversation: the next turn still matches a fresh run
    rt.reset()
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    s = rt.chat_stream(msgs, max_new_tokens=N, stop_ids=())
    for _ in range(3):
        next(s)
    s.close()
    r = rt.chat(msgs, max_new_tokens=N, stop_ids=())
    assert r.cached_tokens > 0
    prompt, _ = build_prompt(msgs)
    assert r.token_ids == rt.generate(prompt, max_new_tokens=N, stop_ids=()).token_ids


# ---- bad input: a clear error, and the runtime still works ---------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no real pixel data): the size check must refuse it
    before any decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_images(rt, baseline, images):
    d = images["dir"]
    (d / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (d / "huge.png").write_bytes(_png_header_only(30000, 30000))
    cases = [
        (str(d / "garbage.png"), "cannot read image"),
        (str(d / "missing.png"), "no such file"),
        (str(d / "huge.png"), "too large"),
        (b"\x89PNG truncated", "cannot read image"),
        (12345, "cannot read image"),
    ]
    for img, words in cases:
        with pytest.raises(InputError, match=words):
            rt.generate(ONE, [img], max_new_tokens=4)
        assert_usable(rt, baseline)


def test_prompt_too_long_names_the_numbers(rt, baseline):
    n = rt.count_tokens(TEXT)
    with pytest.raises(InputError) as e:
        rt.generate(TEXT, max_new_tokens=3000)
    msg = str(e.value)
    assert str(n) in msg and "3000" in msg and "2048" in msg and str(n + 3000) in msg
    with pytest.raises(InputError, match="max_length 2048"):
        rt.chat([{"role": "user", "content": "word " * 2100}], max_new_tokens=1)
    assert_usable(rt, baseline)


def test_exact_max_length_fits(tiny_bundle):
    small = Phi3VRuntime(tiny_bundle, provider="cpu", max_length=64)
    n = small.count_tokens(TEXT)
    r = small.generate(TEXT, max_new_tokens=64 - n, stop_ids=())
    assert len(r.token_ids) == 64 - n
    with pytest.raises(InputError, match=f"{n} \\+ {65 - n} = 65 exceeds max_length 64"):
        small.generate(TEXT, max_new_tokens=65 - n)


def test_placeholder_mismatch(rt, baseline, images):
    with pytest.raises(InputError, match="placeholder"):
        rt.generate(TEXT, [images["a"]], max_new_tokens=4)  # more images than placeholders
    with pytest.raises(InputError, match="placeholder"):
        rt.generate(TWO, [images["a"]], max_new_tokens=4)  # fewer
    with pytest.raises(InputError, match="num_crops"):
        rt.generate(ONE, [images["a"]], max_new_tokens=4, num_crops=99)
    with pytest.raises(InputError):
        rt.chat([{"content": "no role"}])
    assert_usable(rt, baseline)


def test_failure_inside_the_loop_leaves_runtime_usable(rt, baseline, monkeypatch):
    calls = {"n": 0}
    orig = rt.decoder.step

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated ONNX Runtime failure")
        return orig(*args)

    monkeypatch.setattr(rt.decoder, "step", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        rt.generate(TEXT, max_new_tokens=N, stop_ids=())
    assert rt.stats()["running"] == 0 and rt.stats()["free_slots"] == rt.max_batch
    monkeypatch.setattr(rt.decoder, "step", orig)
    assert_usable(rt, baseline)


# ---- bundle and provider errors ------------------------------------------------------------------
def _bundle_copy(src: Path, dst: Path, copy=()) -> Path:
    """A bundle directory of symlinks to `src`'s files, with real copies of the files in `copy`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in copy or f.name == "manifest.json":
            shutil.copy(f, dst / f.name)
        else:
            os.symlink(f, dst / f.name)
    return dst


def test_bundle_errors(rt, baseline, tiny_bundle, tmp_path):
    b = _bundle_copy(tiny_bundle, tmp_path / "version")
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99"):
        Phi3VRuntime(b, provider="cpu")
    m["format_version"] = 1  # the batch-1 decoder of the single-request runtime
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 1; .*re-export"):
        Phi3VRuntime(b, provider="cpu")

    b = _bundle_copy(tiny_bundle, tmp_path / "corrupt", copy=("decoder.onnx",))
    data = bytearray((b / "decoder.onnx").read_bytes())
    data[: len(data) // 2] = os.urandom(len(data) // 2)  # same size: passes the cheap check, fails to load
    (b / "decoder.onnx").unlink()
    (b / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="cannot load decoder.onnx"):
        Phi3VRuntime(b, provider="cpu")
    from phi3v_edge.runtime.bundle import verify_bundle
    assert any("decoder.onnx" in p for p in verify_bundle(b))

    b = _bundle_copy(tiny_bundle, tmp_path / "missing")
    (b / "vision.onnx.data").unlink()
    with pytest.raises(BundleError, match="missing vision.onnx.data"):
        Phi3VRuntime(b, provider="cpu")

    b = _bundle_copy(tiny_bundle, tmp_path / "truncated", copy=("decoder.onnx.data",))
    with open(b / "decoder.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(BundleError, match="decoder.onnx.data has 1000 bytes"):
        Phi3VRuntime(b, provider="cpu")

    with pytest.raises(BundleError, match="no manifest.json"):
        Phi3VRuntime(tmp_path, provider="cpu")
    with pytest.raises(BundleError, match="does not exist"):
        Phi3VRuntime(tmp_path / "nowhere", provider="cpu")
    assert_usable(rt, baseline)


def test_cuda_requested_without_cuda(rt, baseline, tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ProviderError, match="CUDAExecutionProvider") as e:
        Phi3VRuntime(tiny_bundle, provider="cuda")
    assert "onnxruntime-gpu" in str(e.value) and "provider='cpu'" in str(e.value)
    assert_usable(rt, baseline)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_provider_that_fails_to_initialise(rt, baseline, tiny_bundle, monkeypatch):
    """onnxruntime lists CUDA but the session ends up on the CPU (e.g. missing cuDNN): an error, not a fallback."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="could not initialise"):
        Phi3VRuntime(tiny_bundle, provider="cuda", cuda_graph=False)
    monkeypatch.undo()
    assert_usable(rt, baseline)


def test_bad_constructor_arguments(tiny_bundle):
    with pytest.raises(ProviderError, match="'tpu'"):
        Phi3VRuntime(tiny_bundle, provider="tpu")
    with pytest.raises(ValueError, match="long_rope"):
        Phi3VRuntime(tiny_bundle, provider="cpu", long_rope="sometimes")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Phi3VRuntime(tiny_bundle, provider="cpu", max_length=10 ** 7)


# ---- the hot path: no allocation, fixed buffers ---------------------------------------------------
@pytest.fixture(scope="module")
def decoder(rt, tiny_bundle):
    """A Decoder of its own (2 slots), driven directly: the engine's loop thread owns the runtime's."""
    from phi3v_edge.runtime.decode import Decoder

    return Decoder(Path(tiny_bundle) / "decoder.onnx", rt.rope, 256, "cpu", max_batch=2)


def test_decode_steps_allocate_nothing(decoder, rt, monkeypatch):
    import onnxruntime as ort

    dec = decoder
    ids = rt.processor.tokenize(TEXT, [])[0]
    dec.prefill(0, ids, None, 0, False)
    dec.prefill(1, ids[:5], None, 0, False)
    dec.step(2, [7, 9], [ids.size, 5], [False, False])  # binds bucket 2 once
    ptrs = [b.data_ptr() for b in dec.cache.buffers] + [dec.logits.ptr, dec.step_ids.ptr, dec.cos.data_ptr()]
    counts = {"n": 0}

    def forbidden(*a, **k):
        counts["n"] += 1
        raise AssertionError("allocation in a decode step")

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", forbidden)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", forbidden)
    monkeypatch.setattr(dec.session, "io_binding", forbidden)
    for _ in range(5):
        toks = dec.argmax(0, 2)
        dec.step(2, [int(toks[0]), int(toks[1])], list(dec.cache.lengths), [False, False])
        assert all(0 <= t < dec.vocab_size for t in toks)
    monkeypatch.undo()
    assert counts["n"] == 0 and dec.cache.lengths == [ids.size + 6, 11]
    assert ptrs == [b.data_ptr() for b in dec.cache.buffers] + [dec.logits.ptr, dec.step_ids.ptr, dec.cos.data_ptr()]


def test_kv_cache_rows_match_a_fresh_prefill(decoder, rt):
    """Incremental decode in slot 0 (next to a busy slot 1) writes the same K/V rows as one prefill over the
    same tokens in slot 1."""
    dec = decoder
    ids = list(rt.processor.tokenize(TEXT, [])[0])
    dec.prefill(0, np.asarray(ids), None, 0, False)
    dec.prefill(1, np.asarray(ids[:3]), None, 0, False)
    for _ in range(7):
        tok = int(dec.argmax(0, 1)[0])
        dec.step(2, [tok, 5], [len(ids), dec.cache.lengths[1]], [False, False])
        ids.append(tok)
    k_inc, v_inc = dec.cache.layer_numpy(1, slot=0)
    dec.prefill(1, np.asarray(ids), None, 0, False)
    k_one, v_one = dec.cache.layer_numpy(1, slot=1)
    assert k_inc.shape[2] == len(ids) == k_one.shape[2]
    np.testing.assert_allclose(k_inc, k_one, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v_inc, v_one, rtol=1e-4, atol=1e-5)


def test_decode_steps_with_total_at_capacity_equal_plain_steps(rt, tiny_bundle):
    """The CUDA-graph scheme (total_sequence_length fixed at max_length, lengths from seqlens_k per row) gives the
    plain scheme's logits on the CPU kernels too, for rows of different lengths in one step."""
    from phi3v_edge.runtime.decode import Decoder

    ids = rt.processor.tokenize(TEXT, [])[0]
    out = []
    for cap in (False, True):
        dec = Decoder(Path(tiny_bundle) / "decoder.onnx", rt.rope, 256, "cpu", max_batch=2, total_at_capacity=cap)
        dec.prefill(0, ids, None, 0, False)
        dec.prefill(1, ids[:7], None, 0, False)
        rows = []
        for _ in range(6):
            toks = dec.argmax(0, 2)
            dec.step(2, [int(t) for t in toks], list(dec.cache.lengths), [False, False])
            rows.append(dec.logits_rows(0, 2).copy())
        out.append(np.stack(rows))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_runtime_imports_no_torch(tiny_bundle):
    code = (
        "import sys\n"
        "from phi3v_edge.runtime import Phi3VRuntime\n"
        "import phi3v_edge.runtime.cli\n"
        f"rt = Phi3VRuntime({str(tiny_bundle)!r}, provider='cpu', max_length=256)\n"
        "r = rt.generate('<|user|>\\nhi<|end|>\\n<|assistant|>\\n', max_new_tokens=3, stop_ids=())\n"
        "assert len(r.token_ids) == 3\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
