"""A request's life outside the engine: what comes out (Delta, GenerationResult) and the handle a caller holds.

    handle = engine.submit(prompt, images, max_new_tokens=64)     # any thread; bad input raises here
    for delta in handle:                                          # blocking; or `async for delta in handle`
        print(delta.text, end="")
    result = handle.result()                                      # GenerationResult (n=1); handle.results() for n>1
    handle.cancel()                                               # frees the request's slot(s) at the next step

The engine's loop thread pushes deltas with `_push` and ends each row with `_finish_row`; a failure of the
whole request is `_fail`. Consumers only read. Torch-free, onnxruntime-free.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from .errors import RequestCancelled

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # natural log of the token's probability under the model's distribution (before sampling
    #                 filters: log_softmax of the raw logits)
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely alternatives, best first


@dataclass
class Delta:
    """New output of one row: text (may be empty while a stop string or a multi-byte character is pending),
    the token ids it came from, their logprobs when asked, and finish_reason on the row's last delta."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only (a stop id, if hit, is the last one)
    text: str  # their text (special tokens skipped; cut before a stop string, if one was hit)
    finish_reason: str  # "stop" (stop id or stop string), "length" (max_new_tokens reached), or "cancelled"
    timings: dict[str, float] = field(default_factory=dict)  # seconds: preprocess, vision, queue, prefill, ttft, ...
    prompt_tokens: int = 0  # length of the prompt (image placeholder tokens included)
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache (not prefilled again)
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # row among the request's n
    provider: str = ""  # execution provider that ran it ("cpu" / "cuda")
    frame_timestamps: list[float] | None = None  # video= requests: seconds of each sampled frame from the clip's start


class RequestHandle:
    """What `Engine.submit` returns: deltas as they come, the final result(s), cancellation.

    Thread-safe; iterate it from one consumer (sync or async). Deltas are kept, so a consumer that starts
    late still sees everything from the first token."""

    def __init__(self, request_id: str, n: int = 1):
        self.id = request_id
        self.n = n
        self.created = time.perf_counter()
        self._cond = threading.Condition()
        self._deltas: list[Delta] = []
        self._results: list[GenerationResult | None] = [None] * n
        self._error: BaseException | None = None
        self._cancelled = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # ---- consumer side ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        with self._cond:
            return self._error is not None or all(r is not None for r in self._results)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Ask the engine to end the request; its rows finish with finish_reason "cancelled" and their slots
        are freed before the next decode step. Harmless on a finished request."""
        self._cancelled = True
        self._wake()

    def __iter__(self) -> Iterator[Delta]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._deltas) and not self._ended():
                    self._cond.wait(0.5)
                batch = self._deltas[i:]
                i += len(batch)
                ended = self._ended() and i >= len(self._deltas)
                err = self._error
            yield from batch
            if ended:
                if err is not None:
                    raise err
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ev))
        i = 0
        try:
            while True:
                with self._cond:
                    batch = self._deltas[i:]
                    i += len(batch)
                    ended = self._ended() and i >= len(self._deltas)
                    err = self._error
                    if not batch and not ended:
                        ev.clear()
                if batch:
                    for d in batch:
                        yield d
                    continue
                if ended:
                    if err is not None:
                        raise err
                    return
                await ev.wait()
        finally:
            with self._cond:
                self._waiters = [w for w in self._waiters if w[1] is not ev]

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The result of row 0 (the only row unless n > 1); raises the request's error if it failed."""
        return self.results(timeout)[0]

    def results(self, timeout: float | None = None) -> list[GenerationResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._ended():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
                self._cond.wait(0.5 if left is None else min(left, 0.5))
            if self._error is not None:
                raise self._error
            return list(self._results)

    async def aresult(self) -> GenerationResult:
        return (await self.aresults())[0]

    async def aresults(self) -> list[GenerationResult]:
        async for _ in self:
            pass
        return self.results(timeout=0)

    # ---- engine side -----------------------------------------------------------------------------
    def _ended(self) -> bool:
        return self._error is not None or all(r is not None for r in self._results)

    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._deltas.append(delta)
        self._wake()

    def _finish_row(self, index: int, result: GenerationResult) -> None:
        with self._cond:
            self._results[index] = result
        self._wake()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if not self._ended():
                self._error = error
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed: its consumer is gone
                pass


__all__ = ["Delta", "GenerationResult", "RequestHandle", "TokenLogprob", "FINISH_STOP", "FINISH_LENGTH",
           "FINISH_CANCELLED", "RequestCancelled"]
