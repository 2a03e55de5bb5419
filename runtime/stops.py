"""When a row stops: stop ids (the bundle's, replaced or extended per request) and stop strings, matched on
the streamed text so that no delta ever shows part of a stop string."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .errors import InputError


def parse_stop(stop) -> tuple[list[str], list[int]]:
    """`stop`: None, a string, a token id, or a list of both -> (stop strings, stop ids)."""
    if stop is None:
        return [], []
    if isinstance(stop, (str, int, np.integer)):
        stop = [stop]
    strings, ids = [], []
    for s in stop:
        if isinstance(s, str):
            if not s:
                raise InputError("stop strings must not be empty")
            strings.append(s)
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            ids.append(int(s))
        else:
            raise InputError(f"stop entries must be strings or token ids, got {s!r}")
    return strings, ids


def stop_id_set(default: Iterable[int], stop_ids: Iterable[int] | None, extra: Iterable[int]) -> frozenset[int]:
    """The request's stop ids: `stop_ids` replaces the bundle's default (() disables them), `extra` adds."""
    if stop_ids is None:
        ids = set(default)
    else:
        try:
            ids = {int(i) for i in stop_ids}
        except (TypeError, ValueError):
            raise InputError(f"stop_ids must be token ids, got {stop_ids!r}") from None
    return frozenset(ids | set(extra))


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports a match (text cut before it)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.matched = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        buf = self.pending + delta
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            pos = min(h[0] for h in hits)
            self.pending, self.matched = "", True
            return buf[:pos], True
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for j in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:j]):
                    hold = max(hold, j)
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
