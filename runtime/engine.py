"""The continuous-batching engine: one loop thread owns the decoder and its KV slots; any thread submits.

    submit (caller's thread): validate, tokenize, preprocess images, run vision (prepare.py) -> waiting queue
    loop, each turn:
        reap      rows whose handle was cancelled: finish them ("cancelled"), free their slots
        admit     waiting requests into free slots, first come first served (a prefill budget per turn):
                  the free slot whose cached tokens are the longest prefix of the prompt keeps that prefix and
                  prefills only the rest (scheduler.py); n > 1 rows copy the prefilled slot; the first token of
                  each row is sampled from the prefill's logits. Slots are chosen inside the smallest bucket
                  for the running rows (a prefix cached further up is copied in)
        pack      running rows left past that bucket by rows that finished below them move down (a KV copy)
        step      ONE batched decode step over the smallest bucket holding every active slot (decode.py), each
                  row fed the token it sampled last; a row whose next position crosses LongRoPE's
                  original_max_position_embeddings is recomputed alone in its own slot with the long factors
                  (what the reference does) instead
        sample    per row with its own options and random stream (sampler.py): greedy rows by argmax, the
                  others from the host logits; logprobs when asked
        emit      detokenize, match stop strings (rows.py, stops.py), push deltas to each handle; finished rows free
                  their slot (its tokens stay for prefix reuse)

A request fails alone: bad input raises in `submit` before it takes a slot; an error inside the loop fails the
requests of that call and forgets their slots, and the loop goes on. Torch-free.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from . import bundle as fmt
from .decode import Decoder, Vision
from .errors import BundleError, EngineClosed, InputError, RequestCancelled
from .image_transform import DEFAULT_MAX_PIXELS
from .prepare import Prepared, Preparer
from .processor import Phi3VProcessor
from .request import FINISH_CANCELLED, Delta, GenerationResult, RequestHandle
from .rope import needs_long
from .rows import Job, Row, accept, new_row, row_result, sample_next
from .sampler import SamplingParams
from .scheduler import Scheduler, Slot
from .session import resolve_provider
from .stops import parse_stop, stop_id_set

log = logging.getLogger("phi3v_edge.engine")
MAX_LOGPROBS = 5
PREFILL_BUDGET = 512  # prompt tokens prefilled per loop turn while other rows decode (at least one request)


class Engine:
    """Owns the sessions, a KV cache of max_batch slots x max_length rows, and the loop thread.

    provider: "auto" (CUDA when usable, else CPU; `self.provider` says which), "cuda" or "cpu".
    long_rope: "auto" (short factors up to original_max_position_embeddings, one recompute of a row at its
               crossing) or "always" (long factors from the first token).
    max_queue: requests waiting for a slot before `submit` raises EngineBusy."""

    def __init__(self, bundle_dir: str | os.PathLike, provider: str = "auto", max_batch: int = 4,
                 max_length: int = 4096, max_queue: int = 64, long_rope: str = "auto", *, device_id: int = 0,
                 cuda_graph: bool | None = None, threads: int | None = None, verify: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, prefill_budget: int = PREFILL_BUDGET):
        self.bundle_dir = Path(bundle_dir)
        provider = resolve_provider(provider)  # before any file work: "cuda" without CUDA fails right here
        if long_rope not in ("auto", "always"):
            raise ValueError(f"long_rope must be 'auto' or 'always', got {long_rope!r}")
        for name, v, low in (("max_length", max_length, 2), ("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        self.manifest = fmt.load_manifest(self.bundle_dir)
        if verify:
            problems = fmt.verify_bundle(self.bundle_dir)
            if problems:
                raise BundleError(f"bundle {self.bundle_dir} failed verification: " + "; ".join(problems))
        self.rope = self.manifest["rope"]
        limit = self.rope.get("max_position_embeddings")
        if limit and max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings {limit}")
        self.provider, self.long_rope, self.max_length, self.max_batch = provider, long_rope, max_length, max_batch
        self.cuda_graph = (provider == "cuda") if cuda_graph is None else bool(cuda_graph)
        try:
            self.processor = Phi3VProcessor.from_pretrained(self.bundle_dir, max_pixels=max_pixels)
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {self.bundle_dir}: cannot load the tokenizer/processor files: {e}") from None
        self.tokenizer = self.processor.tokenizer
        self.default_stop_ids = tuple(int(i) for i in self.manifest["tokens"].get("stop_ids", self.tokenizer.stop_ids))
        for name in (fmt.DECODER_FILE, fmt.VISION_FILE):
            if not (self.bundle_dir / name).is_file():
                raise BundleError(f"bundle {self.bundle_dir} is missing {name}")
        dec_info = self.manifest.get("decoder") or {}
        self.decoder = Decoder(self.bundle_dir / fmt.DECODER_FILE, self.rope, max_length, provider,
                               max_batch=max_batch, device_id=device_id, cuda_graph=self.cuda_graph, threads=threads,
                               all_logits=bool(dec_info.get("all_logits", False)))
        self.vision = Vision(self.bundle_dir / fmt.VISION_FILE, provider, device_id=device_id, threads=threads)
        self.prepare = Preparer(self.processor, self.vision)
        self.scheduler = Scheduler(max_batch, max_queue)
        self.prefill_budget = int(prefill_budget)
        self.rows: list[Row] = []
        self.counters = {"requests": 0, "prefills": 0, "prefill_tokens": 0, "prefix_tokens_reused": 0,
                         "decode_steps": 0, "decode_rows": 0, "decode_slots": 0, "decode_s": 0.0,
                         "long_recomputes": 0, "slot_moves": 0, "prefix_copies": 0, "cache_spills": 0}
        self._ids = itertools.count(1)
        self._forget_all = False
        self._closing = False
        self._drain_deadline: float | None = None
        self._thread = threading.Thread(target=self._loop, name="phi3v-edge-engine", daemon=True)
        self._thread.start()

    # ---- submitting (any thread) ---------------------------------------------------------------------
    def submit(self, prompt: str, images=None, *, max_new_tokens: int | None = 256, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop=None, stop_ids=None, num_crops: int | None = None,
               logprobs: int | None = None, n: int = 1, reuse_prefix: bool = True) -> RequestHandle:
        """Validate and prepare a request in this thread, queue it, and return its handle (max_new_tokens None:
        as many as fit in max_length after the prompt). Raises InputError for
        a bad request, EngineBusy when the waiting queue is full, EngineClosed after shutdown."""
        t0 = time.perf_counter()
        self._check_open()
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(
                max_new_tokens, (int, np.integer)) or max_new_tokens < 1):
            raise InputError(f"max_new_tokens must be an integer >= 1 or None (as many as fit), got {max_new_tokens!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.max_batch:
            raise InputError(f"n must be an integer from 1 to max_batch ({self.max_batch}), got {n!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, (int, np.integer))
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be None or an integer from 0 to {MAX_LOGPROBS}, got {logprobs!r}")
        params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed).validate()
        stop_strings, extra_ids = parse_stop(stop)
        stops = stop_id_set(self.default_stop_ids, stop_ids, extra_ids)
        prep = self.prepare(prompt, images, num_crops)
        if max_new_tokens is None:  # as many as fit after the prompt
            max_new_tokens = max(1, self.max_length - int(prep.ids.size))
        total = prep.ids.size + int(max_new_tokens)
        if total > self.max_length:
            raise InputError(f"the prompt is {prep.ids.size} tokens and max_new_tokens is {max_new_tokens}: "
                             f"{prep.ids.size} + {max_new_tokens} = {total} exceeds max_length {self.max_length} "
                             "(shorten the prompt or lower max_new_tokens, or use a larger max_length)")
        handle = RequestHandle(f"req-{next(self._ids)}", int(n))
        handle.created = t0
        job = Job(handle, prep, int(n), int(max_new_tokens), params, stops, stop_strings,
                  None if logprobs is None else int(logprobs), bool(reuse_prefix))
        self.scheduler.enqueue(job)
        return handle

    def score(self, prompt: str, images=None, continuation=(), num_crops: int | None = None,
              timeout: float | None = None) -> np.ndarray:
        """Teacher-forced next-token logits: row 0 after the prompt, row i after continuation[:i].
        Returns float32 [len(continuation) + 1, vocab] (evaluation: KL divergence, perplexity)."""
        self._check_open()
        try:
            cont = [int(t) for t in continuation]
        except (TypeError, ValueError):
            raise InputError(f"continuation must be token ids, got {continuation!r}") from None
        prep = self.prepare(prompt, images, num_crops)
        if prep.ids.size + len(cont) > self.max_length:
            raise InputError(f"the prompt ({prep.ids.size} tokens) plus the continuation ({len(cont)}) "
                             f"exceeds max_length {self.max_length}")
        fut: Future = Future()
        job = Job(RequestHandle(f"score-{next(self._ids)}"), prep, 1, 1, SamplingParams(), frozenset(), [], None,
                  False, continuation=cont, future=fut)
        self.scheduler.enqueue(job)
        return fut.result(timeout)

    def count_tokens(self, prompt: str, images=None, num_crops: int | None = None) -> int:
        """Prompt length in tokens (image placeholders included), without running any graph."""
        return int(self.prepare(prompt, images, num_crops, run_vision=False).ids.size)

    def stats(self) -> dict:
        """running / waiting requests, max_batch, free_slots, and the loop's counters since start: requests,
        prefills, prefill_tokens, prefix_tokens_reused, decode_steps, decode_rows (rows summed over the steps),
        decode_slots (bucket sizes summed over the steps: rows + the idle slots the steps paid for), decode_s
        (seconds inside decode steps), long_recomputes, slot_moves (running rows moved to a lower slot to keep
        buckets small), prefix_copies (cached prefixes copied into the chosen slot instead of prefilled),
        cache_spills (a free slot's cached tokens copied aside before its slot was reused)."""
        return {**self.scheduler.stats(), **self.counters}

    def forget(self) -> None:
        """Drop every slot's cached prefix and the image feature cache (nothing is freed or reallocated)."""
        self.prepare.cache.clear()
        self._forget_all = True
        self.scheduler.wake()

    def warmup(self) -> None:
        """One tiny request end to end (a server reports ready after it)."""
        self.submit("<|user|>\nHi<|end|>\n<|assistant|>\n", max_new_tokens=2, reuse_prefix=False).result()

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting; let running and waiting requests finish for up to drain_timeout seconds, then cancel
        the rest; stop the loop thread."""
        self._closing = True
        self._drain_deadline = time.monotonic() + max(0.0, drain_timeout)
        with self.scheduler.cond:
            self.scheduler.closed = True
            self.scheduler.cond.notify_all()
        self._thread.join(drain_timeout + 10.0)

    close = shutdown

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown(drain_timeout=0.0)

    @property
    def alive(self) -> bool:
        """The loop thread runs and the engine takes requests (a health check reads this)."""
        return not self._closing and self._thread.is_alive()

    def _check_open(self) -> None:
        if self._closing or not self._thread.is_alive():
            raise EngineClosed("the engine is shut down and takes no new requests")

    # ---- the loop (its own thread) ------------------------------------------------------------------
    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            with sched.cond:
                while not self.rows and not sched.waiting and not self._forget_all and not self._closing:
                    sched.cond.wait()
                if self._closing and not self.rows and not sched.waiting:
                    return
            try:
                self._turn()
            except BaseException as e:  # a bug in the loop itself: fail what is running, keep serving
                log.exception("engine loop error")
                for row in list(self.rows):
                    self._fail_row(row, e)

    def _turn(self) -> None:
        if self._forget_all:
            self._forget_all = False
            for s in self.scheduler.slots:
                if s.owner is None:
                    s.forget()
        if self._closing and self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
            for row in list(self.rows):
                row.job.handle.cancel()
            self._cancel_waiting()
        self._reap()
        self._admit()
        self._pack()
        self._step()

    def _cancel_waiting(self) -> None:
        with self.scheduler.cond:
            jobs = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
        for job in jobs:
            err = RequestCancelled("the engine shut down before the request started")
            job.handle._fail(err)
            if job.future is not None:
                job.future.set_exception(err)

    def _reap(self) -> None:
        for row in list(self.rows):
            if row.job.handle.cancelled and row.finish is None:
                self._finish(row, FINISH_CANCELLED, time.perf_counter())
        with self.scheduler.cond:
            gone = [j for j in self.scheduler.waiting if j.handle.cancelled]
            for j in gone:
                self.scheduler.waiting.remove(j)
        for j in gone:
            now = time.perf_counter()
            for i in range(j.n):
                j.handle._finish_row(i, GenerationResult([], "", FINISH_CANCELLED, {"total": now - j.handle.created},
                                                         int(j.prep.ids.size), 0, index=i, provider=self.provider))

    def _admit(self) -> None:
        sched, budget = self.scheduler, self.prefill_budget
        spent = 0
        while True:
            with sched.cond:
                if not sched.waiting or len(sched.free()) < sched.waiting[0].n:
                    return
                if spent and spent + sched.waiting[0].prep.ids.size > budget:  # the first one always goes in
                    return
                job = sched.waiting.popleft()
            spent += int(job.prep.ids.size)
            try:
                if job.future is not None:
                    self._run_score(job)
                else:
                    self._start(job)
            except BaseException as e:
                log.exception("prefill failed")
                job.handle._fail(e)
                if job.future is not None and not job.future.done():
                    job.future.set_exception(e)

    def _bound(self, n: int) -> int:
        """Slots below this keep decode steps in the smallest bucket for the running rows plus n more."""
        running = len(self.scheduler.running())
        return self.decoder.bucket_for(min(running + n, self.max_batch))

    def _pack(self) -> None:
        """Move running rows down into free slots when they sit past the bucket their count needs (a row
        finished below them): one copy of each moved row's KV rows saves the idle slots in every later step."""
        moves = self.scheduler.packing_moves(self.decoder.bucket_for)
        involved = [s for pair in moves for s in pair]  # spills never land where a later move writes
        for src, dst in moves:
            row = src.owner
            if row not in self.rows:
                continue
            self._spill(dst, involved)
            self.decoder.copy_slot(src.index, dst.index, self.decoder.cache.lengths[src.index])
            dst.tokens, dst.image_keys, dst.long = list(src.tokens), list(src.image_keys), src.long
            self.scheduler.take(row, dst)
            self.scheduler.release(src)  # its rows stay valid: a reusable prefix of this conversation
            row.slot = dst
            self.counters["slot_moves"] += 1

    def _spill(self, slot: Slot, exclude: list) -> None:
        """Copy a free slot's cached tokens aside (scheduler.spill_target) before `slot` is overwritten."""
        to = self.scheduler.spill_target(slot, exclude)
        if to is None:
            return
        self.decoder.copy_slot(slot.index, to.index, min(len(slot.tokens), self.decoder.cache.lengths[slot.index]))
        to.tokens, to.image_keys, to.long = list(slot.tokens), list(slot.image_keys), slot.long
        to.last_used = slot.last_used
        self.counters["cache_spills"] += 1

    def _long_for(self, total: int) -> bool:
        return self.long_rope == "always" or needs_long(self.rope, total)

    def _prefill(self, slot: Slot, prep: Prepared, keep: int, long: bool) -> None:
        """Make `slot` hold exactly prep.ids, keeping its first `keep` cached rows."""
        ids = prep.ids
        skip = int((ids[:keep] < 0).sum())
        feats = prep.features
        if feats is not None and skip:
            feats = feats[skip:] if feats.shape[0] > skip else None
        try:
            self.decoder.prefill(slot.index, ids[keep:], feats, keep, long)
        except BaseException:
            slot.forget()
            raise
        c = self.counters
        c["prefills"] += 1
        c["prefill_tokens"] += int(ids.size) - keep
        c["prefix_tokens_reused"] += keep
        slot.tokens = [int(i) for i in ids]
        slot.image_keys = list(prep.image_keys)
        slot.long = long

    def _start(self, job: Job) -> None:
        job.admitted = time.perf_counter()
        self.counters["requests"] += 1
        long = self._long_for(int(job.prep.ids.size))
        slots, source, keep = self.scheduler.choose(job.prep.ids, job.prep.image_keys, long, job.n,
                                                    job.reuse_prefix, self._bound(job.n))
        rows = []
        for i, slot in enumerate(slots):
            row = new_row(job, i, slot, self.tokenizer)
            self.scheduler.take(row, slot)
            rows.append(row)
        t0 = time.perf_counter()
        try:
            for slot in slots:  # cached tokens about to be overwritten (all but the kept prefix): copied aside
                if slot is not source or len(slot.tokens) > keep:
                    self._spill(slot, [*slots, source])
            if keep and source is not slots[0]:  # the prefix is cached in a slot outside the bucket: copy it in
                self.decoder.copy_slot(source.index, slots[0].index, keep)
                self.counters["prefix_copies"] += 1
            self._prefill(slots[0], job.prep, keep, long)
            for slot in slots[1:]:  # n > 1: one prefill, copied
                self.decoder.copy_slot(slots[0].index, slot.index, int(job.prep.ids.size))
                slot.tokens, slot.image_keys, slot.long = list(slots[0].tokens), list(slots[0].image_keys), long
        except BaseException:
            for row in rows:
                self.scheduler.release(row.slot, keep_tokens=False)
            raise
        dt = time.perf_counter() - t0
        logits = self.decoder.logits_rows(slots[0].index, 1)[0]
        now = time.perf_counter()
        for row in rows:
            row.prefill_s, row.cached = dt, keep if row.index == 0 else 0
            self.rows.append(row)
            self._accept(row, sample_next(row, logits), logits, now)

    def _run_score(self, job: Job) -> None:
        prep, cont = job.prep, job.continuation
        long = self._long_for(int(prep.ids.size) + len(cont))
        slot = self.scheduler.choose(prep.ids, prep.image_keys, long, 1, False, self._bound(1))[0][0]
        self.scheduler.take(job, slot)
        try:
            self._prefill(slot, prep, 0, long)
            out = [self.decoder.logits_rows(slot.index, 1)[0].astype(np.float32)]
            for tok in cont:
                self.decoder.prefill(slot.index, np.array([tok]), None, len(slot.tokens), long)
                slot.tokens.append(int(tok))
                out.append(self.decoder.logits_rows(slot.index, 1)[0].astype(np.float32))
        except BaseException:
            self.scheduler.release(slot, keep_tokens=False)
            raise
        self.scheduler.release(slot)
        job.future.set_result(np.stack(out))

    def _step(self) -> None:
        rows = [r for r in self.rows if r.finish is None]
        if not rows:
            return
        batched = []
        for row in rows:  # a row whose next position crosses the LongRoPE boundary: recomputed alone
            total = len(row.slot.tokens) + 1
            if self.long_rope == "auto" and not row.slot.long and needs_long(self.rope, total):
                self._recompute_long(row)
            else:
                batched.append(row)
        if not batched:
            return
        dec = self.decoder
        b = dec.bucket_for(max(r.slot.index for r in batched) + 1)
        tokens, positions, long = [0] * b, [None] * b, [False] * b
        for r in batched:
            i = r.slot.index
            tokens[i], positions[i], long[i] = r.pending, len(r.slot.tokens), r.slot.long
        t0 = time.perf_counter()
        try:
            dec.step(b, tokens, positions, long)
        except BaseException as e:
            log.exception("decode step failed")
            for r in batched:
                self._fail_row(r, e)
            return
        c = self.counters
        c["decode_steps"] += 1
        c["decode_rows"] += len(batched)
        c["decode_slots"] += b
        c["decode_s"] += time.perf_counter() - t0
        for r in batched:
            r.slot.tokens.append(int(r.pending))
        greedy = [r for r in batched if r.sampler.params.device_argmax and r.logprobs is None]
        picks = dec.argmax(0, b) if greedy else None
        now = time.perf_counter()
        for r in batched:
            if picks is not None and r in greedy:
                self._accept(r, int(picks[r.slot.index]), None, now)
            else:
                logits = dec.logits_rows(r.slot.index, 1)[0]
                self._accept(r, sample_next(r, logits), logits, now)

    def _recompute_long(self, row: Row) -> None:
        slot = row.slot
        ids = np.asarray(slot.tokens + [row.pending], dtype=np.int64)
        prep = Prepared(ids, row.job.prep.features, slot.image_keys, {})
        self.counters["long_recomputes"] += 1
        try:
            self._prefill(slot, prep, 0, True)
        except BaseException as e:
            log.exception("LongRoPE recompute failed")
            self._fail_row(row, e)
            return
        logits = self.decoder.logits_rows(slot.index, 1)[0]
        self._accept(row, sample_next(row, logits), logits, time.perf_counter())

    # ---- per row: output and finishing (the row's own logic: rows.py) ----------------------------------
    def _accept(self, row: Row, tok: int, logits: np.ndarray | None, now: float) -> None:
        delta = accept(row, tok, logits, now)
        row.job.handle._push(delta)
        if delta.finish_reason is not None:
            self._finish(row, delta.finish_reason, now, pushed=True)

    def _finish(self, row: Row, reason: str, now: float, pushed: bool = False) -> None:
        row.finish = reason
        if not pushed:  # cancelled: the consumer still gets a last delta with the reason
            row.job.handle._push(Delta(row.index, "", [], None, reason))
        res = row_result(row, reason, now, self.provider)
        self.rows.remove(row)
        self.scheduler.release(row.slot)
        row.job.handle._finish_row(row.index, res)

    def _fail_row(self, row: Row, error: BaseException) -> None:
        if row in self.rows:
            self.rows.remove(row)
        row.finish = "error"
        self.scheduler.release(row.slot, keep_tokens=False)
        row.job.handle._fail(error)


__all__ = ["Delta", "Engine", "GenerationResult", "RequestHandle"]
