"""The scheduler's state: the bounded waiting queue (first come, first served) and the KV slots, with the
choice of slot for a new request and the packing of running rows. Torch-free, onnxruntime-free; the engine's
loop thread owns the slots, any thread may enqueue.

A decode step runs over the first b slots (b: the smallest batch bucket holding every running slot), so a row
in a high slot makes every step pay for the idle slots below it. Slots are therefore chosen and kept packed:

- a new request goes to a free slot inside `bound` (the bucket that the running rows plus the new ones need),
  preferring the slot whose cached tokens are the longest prefix of its prompt, then an empty slot, then the
  least recently used one. A longer cached prefix in a slot outside the bound is copied in (`choose` returns it
  as the source), which costs a copy of those KV rows instead of their prefill;
- when rows finish, `packing_moves` names the running rows that sit at or past the bucket their count needs
  and the free slots below it to move them to (the engine copies their KV rows; the slot left behind keeps its
  tokens as a reusable prefix).

Packing does not change which cached prefix is given up: before a free slot holding tokens is overwritten,
its tokens are copied to an empty free slot, or over the least recently used one when that is older
(`spill_target`), so eviction stays least-recently-used over all free slots, wherever they sit.
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


def eviction_order(s: Slot) -> tuple:
    """Which free slot to give up first: empty ones, then the least recently used."""
    return bool(s.tokens), s.last_used, s.index


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
            running = len(self.running())
            return {"running": running, "waiting": len(self.waiting), "max_batch": len(self.slots),
                    "free_slots": len(self.slots) - running}

    # ---- the loop thread -------------------------------------------------------------------------
    def free(self) -> list[Slot]:
        return [s for s in self.slots if s.owner is None]

    def running(self) -> list[Slot]:
        return [s for s in self.slots if s.owner is not None]

    def choose(self, ids: np.ndarray, keys: list, long: bool, n: int, reuse: bool,
               bound: int | None = None) -> tuple[list[Slot], Slot | None, int]:
        """n free slots for a request, the free slot whose cached tokens are the longest prefix of `ids` (None if
        no slot shares a token), and how many leading prompt tokens that source holds (at most len(ids) - 1: the
        last prompt token is always run, its logits give the first new token). Slots below `bound` come first;
        when the source is not the first chosen slot, its `keep` rows are to be copied there."""
        free = self.free()
        if len(free) < n:
            raise ValueError(f"{n} slots asked, {len(free)} free")
        bound = len(self.slots) if bound is None else int(bound)
        best, keep = None, 0
        if reuse:
            for s in free:
                if s.long != long:
                    continue
                k = min(common_prefix(ids, keys, s), int(ids.size) - 1)
                if k > keep or (k == keep and k > 0 and s.index < bound <= best.index):
                    best, keep = s, k
        # inside the bound first (small decode buckets); there: the prefix source, empty slots, least recently used
        chosen = sorted(free, key=lambda s: (s.index >= bound, s is not best, *eviction_order(s)))
        return chosen[:n], best, keep

    def packing_moves(self, bucket_for) -> list[tuple[Slot, Slot]]:
        """(running slot, free slot) pairs that bring every running row below bucket_for(running rows), highest
        slot first, each to an empty or least recently used free slot; [] when the rows are packed enough."""
        running = self.running()
        if not running:
            return []
        bound = bucket_for(len(running))
        movers = sorted((s for s in running if s.index >= bound), key=lambda s: -s.index)
        targets = sorted((s for s in self.free() if s.index < bound), key=eviction_order)
        return list(zip(movers, targets))

    def spill_target(self, slot: Slot, exclude: list) -> Slot | None:
        """Where to keep `slot`'s cached tokens before it is overwritten: an empty free slot, else the least
        recently used free one if it is older than `slot`'s (None: nothing worth less to give up)."""
        spare = [s for s in self.free() if s is not slot and not any(s is e for e in exclude)]
        if not slot.tokens or not spare:
            return None
        t = min(spare, key=eviction_order)
        return t if not t.tokens or t.last_used < slot.last_used else None

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
