"""One generated sequence ("row") of a request: its sampling, its text and stop matching, its result.

The engine (runtime/engine.py) runs rows in decode steps; everything that concerns one row alone lives here as
small free functions: `sample_next` (greedy or the row's own Sampler), `accept` (a new token -> the row's next
Delta: detokenized, stop ids and stop strings checked, logprobs when asked) and `row_result` (its final
GenerationResult with timings). Torch-free, onnxruntime-free.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .prepare import Prepared
from .request import (
    FINISH_LENGTH,
    FINISH_STOP,
    Delta,
    GenerationResult,
    RequestHandle,
    TokenLogprob,
)
from .sampler import Sampler, SamplingParams
from .scheduler import Slot
from .stops import StopMatcher
from .tokenizer import StreamDecoder


@dataclass
class Job:
    """A submitted request, waiting for its slot(s)."""
    handle: RequestHandle
    prep: Prepared
    n: int
    max_new_tokens: int
    params: SamplingParams
    stops: frozenset
    stop_strings: list
    logprobs: int | None
    reuse_prefix: bool
    continuation: list | None = None  # score jobs: teacher-forced ids
    future: Future | None = None  # score jobs: the logits rows
    admitted: float = 0.0


@dataclass
class Row:
    """One generated sequence, decoding in one slot."""
    job: Job
    index: int
    slot: Slot
    sampler: Sampler
    detok: StreamDecoder
    matcher: StopMatcher
    out: list = field(default_factory=list)
    text: list = field(default_factory=list)
    logprobs: list | None = None
    pending: int | None = None  # sampled, not yet fed to the decoder
    first_token_at: float = 0.0
    prefill_s: float = 0.0
    cached: int = 0
    finish: str | None = None


def new_row(job: Job, index: int, slot: Slot, tokenizer) -> Row:
    """Row `index` of a request: rows after the first draw from seed + index (their own random streams)."""
    p = job.params
    if p.seed is not None and index:
        p = SamplingParams(p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed + index)
    return Row(job, index, slot, Sampler(p), StreamDecoder(tokenizer), StopMatcher(job.stop_strings),
               logprobs=[] if job.logprobs is not None else None)


def sample_next(row: Row, logits: np.ndarray) -> int:
    """The row's next token from its logits [vocab] (repetition penalty over the ids its slot holds)."""
    if row.sampler.params.device_argmax:
        return int(np.argmax(logits))
    return row.sampler(logits, row.slot.tokens)


def accept(row: Row, tok: int, logits: np.ndarray | None, now: float) -> Delta:
    """Record the row's new token; -> its Delta (finish_reason set when this token ends the row)."""
    job = row.job
    row.out.append(tok)
    if len(row.out) == 1:
        row.first_token_at = now
    lp = None
    if row.logprobs is not None:
        lp = token_logprob(logits, tok, job.logprobs)
        row.logprobs.append(lp)
    hit_stop = tok in job.stops
    last = hit_stop or len(row.out) == job.max_new_tokens
    text = row.detok.put(tok)
    if last:
        text += row.detok.flush()
    emit, matched = row.matcher.feed(text)
    finish = FINISH_STOP if (matched or hit_stop) else (FINISH_LENGTH if last else None)
    if finish is not None and not matched:
        emit += row.matcher.flush()
    row.text.append(emit)
    if finish is None:
        row.pending = tok
    return Delta(row.index, emit, [tok], [lp] if lp is not None else None, finish)


def row_result(row: Row, reason: str, now: float, provider: str) -> GenerationResult:
    job = row.job
    created = job.handle.created
    first = row.first_token_at or now
    steps = max(0, len(row.out) - 1)
    t = dict(job.prep.timings)
    t.update(queue=max(0.0, job.admitted - created - t.get("preprocess", 0) - t.get("vision", 0)),
             prefill=row.prefill_s, ttft=first - created, decode=now - first, total=now - created,
             decode_steps=steps, tokens_per_s=steps / (now - first) if steps and now > first else 0.0)
    return GenerationResult(list(row.out), "".join(row.text), reason, t, int(job.prep.ids.size), row.cached,
                            row.logprobs, row.index, provider)


def token_logprob(logits: np.ndarray, tok: int, top: int) -> TokenLogprob:
    """log_softmax of the raw logits at `tok`, and the `top` most likely alternatives (best first)."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    alts: list[tuple[int, float]] = []
    if top:
        idx = np.argpartition(-x, top - 1)[:top]
        idx = idx[np.lexsort((idx, -x[idx]))]
        alts = [(int(i), float(x[i] - lse)) for i in idx]
    return TokenLogprob(int(tok), float(x[tok] - lse), alts)
