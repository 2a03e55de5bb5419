"""The continuous-batching engine (runtime/engine.py) on a tiny random bundle whose LongRoPE boundary is at 340
positions: rows that share decode steps give the tokens they give alone.

Solo answers come from the same engine with one request at a time; batched ones from requests submitted
together (their decode steps are shared: the engine's decode_steps counter says so).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.engine import Engine
from phi3v_edge.runtime.errors import EngineBusy, EngineClosed, InputError

ORIG = 340
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def text(n_words: int, offset: int = 0) -> str:
    return "<|user|>\n" + " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n_words)) + "<|end|>\n<|assistant|>\n"


ONE = "<|user|>\n<|image_1|>\nWhat is in this picture?<|end|>\n<|assistant|>\n"
TWO = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare the two images.<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from phi3v_edge.export.bundle import export_bundle
    from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint

    cfg = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
                      original_max_position_embeddings=ORIG)
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("eng_ckpt"), cfg, seed=11)
    return export_bundle(ckpt, tmp_path_factory.mktemp("eng_bundle") / "fp32", precision="fp32", target="cpu")


@pytest.fixture(scope="module")
def engine(bundle):
    eng = Engine(bundle, provider="cpu", max_batch=4, max_length=1024, max_queue=16)
    yield eng
    eng.shutdown(drain_timeout=5)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return {"a": Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)),
            "b": Image.fromarray(rng.integers(0, 256, (700, 200, 3), dtype=np.uint8)),
            "sq": Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))}


def mixed_requests(images):
    """Text / one image / two images; greedy / seeded sampling / repetition penalty; different lengths and
    max_new_tokens; the last one crosses the LongRoPE boundary while decoding."""
    return [
        dict(prompt=text(12), max_new_tokens=24),
        dict(prompt=ONE, images=[images["a"]], max_new_tokens=16, num_crops=2),
        dict(prompt=TWO, images=[images["a"], images["b"]], num_crops=1, max_new_tokens=12, do_sample=True, temperature=0.9,
             top_k=20, seed=5),  # ~630 tokens: the long factors from the start
        dict(prompt=text(40, 3), max_new_tokens=20, do_sample=True, top_p=0.9, seed=9, repetition_penalty=1.2),
        dict(prompt=text(250), max_new_tokens=40),  # ~310 prompt tokens: crosses 340 while decoding
    ]


def solo(engine, req):
    return engine.submit(stop_ids=(), reuse_prefix=False, **req).result(timeout=120)


def test_mixed_batch_equals_each_request_alone(engine, images):
    reqs = mixed_requests(images)
    alone = [solo(engine, r) for r in reqs]
    n = engine.count_tokens(reqs[-1]["prompt"])
    assert n <= ORIG < n + reqs[-1]["max_new_tokens"], "the last request must cross the boundary"
    before = engine.stats()
    handles = [engine.submit(stop_ids=(), reuse_prefix=False, **r) for r in reqs]
    together = [h.result(timeout=120) for h in handles]
    after = engine.stats()
    for r, a, t in zip(reqs, alone, together):
        assert t.token_ids == a.token_ids, r["prompt"][:30]
        assert t.text == a.text and t.finish_reason == a.finish_reason == "length"
        assert len(t.token_ids) == r["max_new_tokens"]
    # the rows shared steps: fewer decode steps than the requests' own steps added up
    own = sum(len(t.token_ids) - 1 for t in together)
    steps = after["decode_steps"] - before["decode_steps"]
    assert steps < own - 20, (steps, own)
    lengths = [engine.count_tokens(r["prompt"], r.get("images"), r.get("num_crops")) for r in reqs]
    crossing = sum(1 for n, r in zip(lengths, reqs) if n <= ORIG < n + r["max_new_tokens"] - 1)
    assert crossing >= 1 and any(n > ORIG for n in lengths)  # rows under both factor sets share steps
    assert after["long_recomputes"] - before["long_recomputes"] == crossing
    assert after["running"] == 0 and after["free_slots"] == 4


def test_streams_from_eight_threads_equal_solo_answers(engine):
    prompts = [text(5 + 3 * i, i) for i in range(6)]
    want = {p: solo(engine, dict(prompt=p, max_new_tokens=10)).token_ids for p in prompts}
    got, errors = [], []

    def client(k):
        try:
            for j in range(3):
                p = prompts[(k + j) % len(prompts)]
                h = engine.submit(p, max_new_tokens=10, stop_ids=())
                deltas = list(h)
                r = h.result()
                assert "".join(d.text for d in deltas) == r.text
                assert [t for d in deltas for t in d.token_ids] == r.token_ids
                got.append((p, r.token_ids))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 24
    assert all(toks == want[p] for p, toks in got)


def test_cancel_mid_stream_frees_the_slot_and_leaves_others_unchanged(engine, images):
    reqs = mixed_requests(images)[:2]
    alone = [solo(engine, r) for r in reqs]
    victim = engine.submit(text(30), max_new_tokens=200, stop_ids=())
    others = [engine.submit(stop_ids=(), reuse_prefix=False, **r) for r in reqs]
    it = iter(victim)
    first = [next(it) for _ in range(3)]
    victim.cancel()
    rest = list(it)
    res = victim.result(timeout=30)
    assert res.finish_reason == "cancelled" and 3 <= len(res.token_ids) < 200
    assert rest[-1].finish_reason == "cancelled" and first[0].finish_reason is None
    assert [h.result(timeout=120).token_ids for h in others] == [a.token_ids for a in alone]
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0


def test_bad_input_fails_only_its_own_request(engine, images):
    good = dict(prompt=text(10), max_new_tokens=8)
    want = solo(engine, good).token_ids
    running = engine.submit(stop_ids=(), **good)
    with pytest.raises(InputError, match="placeholder"):
        engine.submit(TWO, images=[images["a"]], max_new_tokens=4)
    with pytest.raises(InputError, match="cannot read image"):
        engine.submit(ONE, images=[b"not an image"], max_new_tokens=4)
    with pytest.raises(InputError, match="exceeds max_length 1024"):
        engine.submit(text(10), max_new_tokens=5000)
    with pytest.raises(InputError, match="n must be"):
        engine.submit(text(10), max_new_tokens=4, n=9)
    with pytest.raises(InputError, match="logprobs"):
        engine.submit(text(10), max_new_tokens=4, logprobs=6)
    with pytest.raises(InputError, match="seed must be an integer >= 0"):
        engine.submit(text(10), max_new_tokens=4, do_sample=True, seed=-1)
    assert running.result(timeout=60).token_ids == want
    assert solo(engine, good).token_ids == want


def test_second_chat_turn_prefills_only_new_tokens(engine):
    """(Images in a conversation: tests/test_runtime.py, on a bundle without a near LongRoPE boundary.)"""
    turn1 = [{"role": "user", "content": " ".join(WORDS * 3)}]
    p1, _ = build_prompt(turn1)
    r1 = engine.submit(p1, max_new_tokens=12, stop_ids=()).result(timeout=60)
    msgs = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And then what?"}]
    p2, _ = build_prompt(msgs)
    before = engine.stats()
    warm = engine.submit(p2, max_new_tokens=16, stop_ids=()).result(timeout=60)
    after = engine.stats()
    cold = engine.submit(p2, max_new_tokens=16, stop_ids=(), reuse_prefix=False).result(timeout=60)
    assert warm.cached_tokens >= r1.prompt_tokens and cold.cached_tokens == 0
    assert after["prefill_tokens"] - before["prefill_tokens"] == warm.prompt_tokens - warm.cached_tokens
    assert warm.token_ids == cold.token_ids


def test_n_rows_share_one_prefill(engine):
    p = text(20)
    greedy = solo(engine, dict(prompt=p, max_new_tokens=8))
    before = engine.stats()
    h = engine.submit(p, max_new_tokens=8, stop_ids=(), n=3, reuse_prefix=False, logprobs=2)
    rows = h.results(timeout=60)
    assert engine.stats()["prefills"] - before["prefills"] == 1
    assert [r.index for r in rows] == [0, 1, 2]
    assert all(r.token_ids == greedy.token_ids for r in rows)  # greedy rows: same tokens in every row
    lp = rows[0].logprobs
    assert len(lp) == 8 and all(x.token_id == t for x, t in zip(lp, greedy.token_ids))
    assert all(x.top[0][0] == x.token_id and abs(x.top[0][1] - x.logprob) < 1e-9 and x.logprob <= 0 for x in lp)
    sampled = engine.submit(p, max_new_tokens=12, stop_ids=(), n=3, do_sample=True, temperature=1.5, seed=3)
    toks = [r.token_ids for r in sampled.results(timeout=60)]
    assert len({tuple(t) for t in toks}) > 1  # each row has its own random stream (seed + row)
    again = engine.submit(p, max_new_tokens=12, stop_ids=(), n=3, do_sample=True, temperature=1.5, seed=3)
    assert [r.token_ids for r in again.results(timeout=60)] == toks


def test_max_new_tokens_none_fills_max_length(bundle):
    eng = Engine(bundle, provider="cpu", max_batch=1, max_length=64)
    try:
        n = eng.count_tokens(text(10))
        r = eng.submit(text(10), max_new_tokens=None, stop_ids=()).result(timeout=60)
        assert len(r.token_ids) == 64 - n and r.finish_reason == "length"
    finally:
        eng.shutdown(drain_timeout=5)


def test_asyncio_consumer(engine):
    import asyncio

    p = text(8)
    want = solo(engine, dict(prompt=p, max_new_tokens=6))

    async def main():
        h = await asyncio.to_thread(engine.submit, p, max_new_tokens=6, stop_ids=())
        deltas = [d async for d in h]
        return deltas, await h.aresult()

    deltas, res = asyncio.run(main())
    assert res.token_ids == want.token_ids and "".join(d.text for d in deltas) == want.text


def test_queue_full_and_shutdown(bundle):
    eng = Engine(bundle, provider="cpu", max_batch=1, max_length=256, max_queue=1)
    try:
        first = eng.submit(text(10), max_new_tokens=150, stop_ids=())
        while eng.stats()["running"] == 0:
            time.sleep(0.01)
        second = eng.submit(text(11), max_new_tokens=4, stop_ids=())
        with pytest.raises(EngineBusy, match="queue is full"):
            eng.submit(text(12), max_new_tokens=4)
        first.cancel()
        assert len(second.result(timeout=60).token_ids) == 4
        assert eng.alive
    finally:
        eng.shutdown(drain_timeout=5)
    assert not eng.alive
    with pytest.raises(EngineClosed):
        eng.submit(text(10), max_new_tokens=4)


def test_demo_model_examples_batched_equal_sequential():
    """The bundled demo model (INT4): its example questions all at once, 4 rows a step, give the answers they give
    one by one, and the expected ones (the committed checkpoint answers all of them; the floor allows one miss)."""
    from phi3v_edge.models.demo import demo_bundle, load_questions

    qs = load_questions()
    eng = Engine(demo_bundle("cpu", log=lambda *a: None), provider="cpu", max_batch=4, max_length=2048)
    try:
        prompts = [build_prompt([{"role": "user", "content": q["question"], "images": q["images"]}]) for q in qs]
        seq = [eng.submit(p, i, max_new_tokens=8, reuse_prefix=False).result(timeout=120) for p, i in prompts]
        handles = [eng.submit(p, i, max_new_tokens=8, reuse_prefix=False) for p, i in prompts]
        together = [h.result(timeout=120) for h in handles]
    finally:
        eng.shutdown(drain_timeout=5)
    assert [r.token_ids for r in together] == [r.token_ids for r in seq]
    right = sum(r.text.strip() == q["answer"] for r, q in zip(together, qs))
    assert right >= len(qs) - 1, [r.text for r in together]


def delta(before: dict, after: dict, *keys) -> dict:
    return {k: after[k] - before[k] for k in keys}


def test_rows_stay_packed_in_the_smallest_bucket(bundle):
    """max_batch 8: two requests after an earlier one decode in bucket 2 (not in the empty slots 1-2, bucket 4);
    a long row left alone past finished ones moves down to slot 0 and decodes in bucket 1; tokens unchanged."""
    eng = Engine(bundle, provider="cpu", max_batch=8, max_length=1024)
    try:
        reqs = [dict(prompt=text(8 + 2 * i, i), max_new_tokens=n) for i, n in enumerate((4, 4, 4, 30))]
        alone = [eng.submit(stop_ids=(), reuse_prefix=False, **r).result(timeout=60) for r in reqs]
        before = eng.stats()
        pair = [eng.submit(stop_ids=(), reuse_prefix=False, **r) for r in reqs[:2]]
        assert [h.result(timeout=60).token_ids for h in pair] == [a.token_ids for a in alone[:2]]
        d = delta(before, eng.stats(), "decode_steps", "decode_rows", "decode_slots")
        assert d["decode_slots"] == d["decode_rows"] == 2 * d["decode_steps"], d
        before = eng.stats()
        four = [eng.submit(stop_ids=(), reuse_prefix=False, **r) for r in reqs]
        assert [h.result(timeout=60).token_ids for h in four] == [a.token_ids for a in alone]
        d = delta(before, eng.stats(), "decode_steps", "decode_rows", "decode_slots", "slot_moves")
        assert d["slot_moves"] >= 1, d
        assert d["decode_slots"] - d["decode_rows"] <= 3, d  # at most one step with an idle slot in bucket 4
    finally:
        eng.shutdown(drain_timeout=5)


def test_prefix_cached_in_another_slot_is_copied_not_prefilled(bundle):
    """Two conversations take turns on a max_batch 8 engine: each new turn runs in slot 0 (bucket 1); the other
    conversation's cache is copied aside first, and a turn's own earlier cache is copied back in: both second
    turns prefill only their new tokens and equal cold runs."""
    eng = Engine(bundle, provider="cpu", max_batch=8, max_length=1024)
    try:
        convs = [[{"role": "user", "content": " ".join(WORDS[i:] + WORDS[:i])}] for i in (0, 5)]
        first = [eng.submit(build_prompt(c)[0], max_new_tokens=6, stop_ids=()).result(timeout=60) for c in convs]
        before = eng.stats()
        for c, r1 in zip(convs, first):
            p2 = build_prompt(c + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "Why?"}])[0]
            warm = eng.submit(p2, max_new_tokens=8, stop_ids=()).result(timeout=60)
            cold = eng.submit(p2, max_new_tokens=8, stop_ids=(), reuse_prefix=False).result(timeout=60)
            assert warm.cached_tokens >= r1.prompt_tokens and warm.token_ids == cold.token_ids
        d = delta(before, eng.stats(), "prefix_copies", "cache_spills", "decode_rows", "decode_slots")
        assert d["prefix_copies"] >= 1 and d["cache_spills"] >= 1 and d["decode_slots"] == d["decode_rows"], d
    finally:
        eng.shutdown(drain_timeout=5)
