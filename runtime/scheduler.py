"""The scheduler's state: the bounded waiting queue (first come, first served) and the KV slots, with the
choice of slot for a new request (the free slot whose cached tokens are the longest prefix of the new prompt,
else an empty or least recently used one). Torch-free, onnxruntime-free; the engine's loop thread owns the
slots, any thread may enqueue.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import EngineBusy, EngineClosed


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # ids whose KV the slot holds (-k: image k's rows)
    image_keys: list = field(default_factory=list)  # image k's identity for the -k in tokens
    long: bool = False  # LongRoPE factor set its rows were written with
    owner: object | None = None  # the row decoding in it (None: free; its tokens stay reusable)
    last_used: float = 0.0

    def forget(self) -> None:
        self.tokens, self.image_keys, self.long = [], [], False


def common_prefix(ids: np.ndarray, keys: list, slot: Slot) -> int:
    """Length of the common prefix of `ids` and the slot's tokens; an image placeholder matches only when both
    sides' image is the same content with the same crops."""
    n = min(int(ids.size), len(slot.tokens))
    if n == 0:
        return 0
    a = ids[:n]
    b = np.asarray(slot.tokens[:n], dtype=np.int64)
    diff = np.flatnonzero(a != b)
    end = int(diff[0]) if diff.size else n
    for pos in np.flatnonzero(a[:end] < 0):  # placeholders inside the equal run: same image on both sides?
        k = int(-a[pos])
        mine = keys[k - 1] if k - 1 < len(keys) else None
        theirs = slot.image_keys[k - 1] if k - 1 < len(slot.image_keys) else None
        if mine is None or mine != theirs:
            return int(pos)
    return end


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int):
        self.slots = [Slot(i) for i in range(max_batch)]
        self.max_queue = int(max_queue)
        self.waiting: deque = deque()
        self.cond = threading.Condition()
        self.closed = False

    # ---- any thread ------------------------------------------------------------------------------
    def enqueue(self, job) -> None:
        with self.cond:
            if self.closed:
                raise EngineClosed("the engine is shut down and takes no new requests")
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"the waiting queue is full ({self.max_queue} requests waiting for "
                                 f"{len(self.slots)} slots): retry later")
            self.waiting.append(job)
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            running = sum(1 for s in self.slots if s.owner is not None)
            return {"running": running, "waiting": len(self.waiting), "max_batch": len(self.slots),
                    "free_slots": len(self.slots) - running}

    # ---- the loop thread -------------------------------------------------------------------------
    def free(self) -> list[Slot]:
        return [s for s in self.slots if s.owner is None]

    def choose(self, ids: np.ndarray, keys: list, long: bool, n: int, reuse: bool) -> tuple[list[Slot], int]:
        """n free slots for a request and how many leading prompt tokens the first one already holds (at
        most len(ids) - 1: the last prompt token is always run, its logits give the first new token)."""
        free = self.free()
        if len(free) < n:
            raise ValueError(f"{n} slots asked, {len(free)} free")
        best, keep = None, 0
        if reuse:
            for s in free:
                if s.long != long:
                    continue
                k = min(common_prefix(ids, keys, s), int(ids.size) - 1)
                if k > keep:
                    best, keep = s, k
        # the rest: empty slots first (lowest index keeps decode buckets small), then least recently used
        rest = sorted((s for s in free if s is not best), key=lambda s: (bool(s.tokens), s.last_used, s.index))
        chosen = ([best] if best is not None else []) + rest
        return chosen[:n], keep

    def take(self, owner, slot: Slot) -> None:
        with self.cond:
            slot.owner = owner
            slot.last_used = time.monotonic()

    def release(self, slot: Slot, keep_tokens: bool = True) -> None:
        with self.cond:
            slot.owner = None
            slot.last_used = time.monotonic()
            if not keep_tokens:
                slot.forget()
