"""Slot choice and packing (runtime/scheduler.py), without a model: decode steps run over the first b slots, so
new requests go inside the smallest bucket for the running rows, running rows move down when rows below them
finish, and a free slot's cached tokens are copied aside (not lost) before its slot is reused."""
from __future__ import annotations

import numpy as np

from phi3v_edge.runtime.decode import batch_buckets
from phi3v_edge.runtime.scheduler import Scheduler


def bucket_for(buckets):
    return lambda rows: next(b for b in buckets if b >= rows)


def cached(sched, index, tokens, used):
    s = sched.slots[index]
    s.tokens, s.last_used = list(tokens), used
    return s


def test_new_request_goes_inside_the_bound_even_when_empty_slots_are_further_up():
    sched = Scheduler(8, 4)
    cached(sched, 0, [1, 2, 3], used=5.0)  # an older request's cache in slot 0, slots 1..7 empty
    chosen, source, keep = sched.choose(np.array([7, 8, 9]), [], False, 1, True, bound=1)
    assert [s.index for s in chosen] == [0] and source is None and keep == 0
    # without a bound (the old rule) the empty slot 1 would be taken: the decode bucket would double
    chosen, _, _ = sched.choose(np.array([7, 8, 9]), [], False, 1, True)
    assert [s.index for s in chosen] == [1]


def test_prefix_cached_outside_the_bound_is_named_as_the_source():
    sched = Scheduler(8, 4)
    sched.slots[0].owner = "running row"
    cached(sched, 5, [1, 2, 3, 4], used=1.0)
    ids = np.array([1, 2, 3, 4, 5, 6])
    chosen, source, keep = sched.choose(ids, [], False, 1, True, bound=2)
    assert [s.index for s in chosen] == [1] and source is sched.slots[5] and keep == 4
    # inside the bound the source itself is chosen (no copy)
    chosen, source, keep = sched.choose(ids, [], False, 1, True, bound=8)
    assert chosen[0] is source is sched.slots[5] and keep == 4


def test_packing_moves_running_rows_below_the_bucket_their_count_needs():
    sched = Scheduler(8, 4)
    for i in (2, 3, 6):
        sched.slots[i].owner = f"row {i}"
    cached(sched, 0, [1], used=9.0)  # recently used cache
    cached(sched, 1, [2], used=1.0)  # older cache: the one a moved row overwrites
    moves = sched.packing_moves(bucket_for(batch_buckets(8)))  # 3 rows -> bucket 4: slot 6 must move
    assert [(a.index, b.index) for a, b in moves] == [(6, 1)]
    sched.slots[6].owner = None
    sched.slots[3].owner = None  # 1 row left (slot 2) -> bucket 1
    moves = sched.packing_moves(bucket_for(batch_buckets(8)))
    assert [(a.index, b.index) for a, b in moves] == [(2, 0)]
    sched.slots[2].owner = None
    assert sched.packing_moves(bucket_for(batch_buckets(8))) == []


def test_spill_target_keeps_least_recently_used_eviction():
    sched = Scheduler(4, 4)
    a = cached(sched, 0, [1, 2], used=5.0)
    assert sched.spill_target(a, [a]) is sched.slots[1]  # an empty slot first
    for i, used in ((1, 7.0), (2, 3.0), (3, 8.0)):
        cached(sched, i, [i], used=used)
    assert sched.spill_target(a, [a]) is sched.slots[2]  # else the least recently used, older than slot 0's
    sched.slots[2].last_used = 6.0
    assert sched.spill_target(a, [a]) is None  # every other cache is newer: slot 0's is the one to give up
    assert sched.spill_target(sched.slots[1], [sched.slots[0]]) is sched.slots[2]  # slot 1's (7.0) beats slot 2's (6.0)
