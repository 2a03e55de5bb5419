"""Requests as a new user writes them (issue 16): numpy images, placeholders already in the text, provider "auto"."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from phi3v_edge.runtime import Phi3VRuntime
from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.errors import InputError

PROMPT = "<|user|>\n<|image_1|>\nWhat color is it?<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return Phi3VRuntime(tiny_bundle, provider="cpu", max_length=4096)


@pytest.fixture(scope="module")
def arr():
    return np.random.default_rng(7).integers(0, 256, (360, 480, 3), dtype=np.uint8)


def test_generate_with_a_numpy_image(rt, arr):
    ref = rt.generate(PROMPT, [Image.fromarray(arr)], max_new_tokens=5, stop_ids=())
    got = rt.generate(PROMPT, images=arr, max_new_tokens=5, stop_ids=())  # was: "... but 360 images were given"
    assert got.token_ids == ref.token_ids and got.prompt_tokens == ref.prompt_tokens
    two = "<|user|>\n<|image_1|>\n<|image_2|>\nSame?<|end|>\n<|assistant|>\n"
    ref2 = rt.generate(two, [Image.fromarray(arr), Image.fromarray(arr[:, ::-1].copy())], max_new_tokens=5,
                       stop_ids=())
    assert rt.generate(two, [arr, arr[:, ::-1]], max_new_tokens=5, stop_ids=()).token_ids == ref2.token_ids
    # chat messages take an array as one image too
    msgs = [{"role": "user", "content": "What color is it?", "images": arr}]
    assert build_prompt(msgs)[0] == PROMPT
    assert rt.chat(msgs, max_new_tokens=5, stop_ids=(), keep_cache=False).token_ids == ref.token_ids


@pytest.mark.parametrize("bad, words", [
    (np.zeros((360, 480, 3), np.float64), "dtype float64"),
    (np.zeros((1, 360, 480, 3), np.uint8), "shape 1x360x480x3"),
])
def test_bad_numpy_image_is_an_input_error_and_the_runtime_goes_on(rt, arr, bad, words):
    with pytest.raises(InputError, match=words):
        rt.generate(PROMPT, images=bad, max_new_tokens=2)
    assert len(rt.generate(PROMPT, images=arr, max_new_tokens=2, stop_ids=()).token_ids) == 2


# ---- provider "auto": one rule for the API, the CLI and export (issue 16 item 8) ----------------------------


def _cuda_really_usable() -> bool:
    from phi3v_edge.runtime import session

    session.cuda_usable.cache_clear()
    return session.cuda_usable()


def test_auto_is_cpu_without_a_usable_cuda_provider(monkeypatch):
    import onnxruntime as ort

    from phi3v_edge.runtime import session
    from phi3v_edge.runtime.errors import ProviderError

    if _cuda_really_usable():
        assert session.resolve_provider("auto") == "cuda"
        return
    assert session.resolve_provider("auto") == "cpu" and session.resolve_provider("cpu") == "cpu"
    with pytest.raises(ProviderError, match="CUDAExecutionProvider"):
        session.resolve_provider("cuda")  # explicit cuda: a clear error, never a silent fallback
    with pytest.raises(ProviderError, match="'auto', 'cuda' or 'cpu'"):
        session.resolve_provider("tpu")
    # listed but not usable (the old CLI rule looked at the list only): the probe session finds out
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"] + real)
    session.cuda_usable.cache_clear()
    try:
        assert session.resolve_provider("auto") == "cpu"
    finally:
        session.cuda_usable.cache_clear()


def test_runtime_defaults_to_auto(tiny_bundle):
    rt = Phi3VRuntime(tiny_bundle, max_length=256)  # used to default to "cuda" and fail on a CPU-only machine
    assert rt.provider == ("cuda" if _cuda_really_usable() else "cpu")
    assert len(rt.generate("<|user|>\nHi<|end|>\n<|assistant|>\n", max_new_tokens=2, stop_ids=()).token_ids) == 2
