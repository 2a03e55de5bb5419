"""Next-token choice: greedy, or repetition penalty -> temperature -> top-k -> top-p -> a draw from a seeded
numpy Generator. Torch-free; the same order of operations as the PyTorch reference (models/sampling.py),
with numpy's random stream (so seeded draws are reproducible here, not bit-equal to torch's).

Greedy decoding without a repetition penalty never brings logits to the host: the decoder loop runs an
on-device ArgMax instead (runtime/decode.py), and calls this module only when sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise InputError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        """Pure argmax (temperature 0 counts as greedy, as in the reference)."""
        return not self.do_sample or self.temperature <= 0

    @property
    def device_argmax(self) -> bool:
        """The next token can be picked on the device without touching the logits on the host."""
        return self.greedy and self.repetition_penalty == 1.0


def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    """HF/CTRL rule on the ids already in the sequence: positive logits / penalty, negative ones * penalty."""
    if penalty == 1.0:
        return logits
    ids = np.unique(np.asarray([i for i in history if i >= 0], dtype=np.int64))
    ids = ids[ids < logits.shape[-1]]
    if ids.size == 0:
        return logits
    logits = logits.copy()
    x = logits[ids]
    logits[ids] = np.where(x > 0, x / penalty, x * penalty)
    return logits


class Sampler:
    """One per request: holds the request's random stream.

    With top_k, sampling works on the k best candidates sorted largest first: the decoder loop gets them from
    an on-device TopK (`pick`), or from the host logits when a repetition penalty is on (`__call__`); both
    give the same draw for the same seed. Without top_k, the host logits are used (`__call__`)."""

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history=()) -> int:
        """logits [vocab] (any float dtype) and the ids so far -> next token id."""
        p = self.params
        x = np.asarray(logits, dtype=np.float32).reshape(-1)
        x = apply_repetition_penalty(x, history, p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(x))
        if p.top_k and p.top_k < x.size:
            ids = top_candidates(x, p.top_k)
            return self.pick(x[ids], ids)
        z = x.astype(np.float64) / float(p.temperature)
        if p.top_p < 1.0:
            ids, total = nucleus_candidates(z, p.top_p)
            return int(ids[sample_sorted(z[ids], 1.0, p.top_p, self.rng, total)])
        return _draw(_softmax(z), self.rng)

    def pick(self, values: np.ndarray, ids: np.ndarray) -> int:
        """The top-k candidates: values [k] sorted largest first, their ids [k] -> the drawn id."""
        p = self.params
        if p.greedy:
            return int(ids[0])
        return int(ids[sample_sorted(np.asarray(values, dtype=np.float64), p.temperature, p.top_p, self.rng)])


def top_candidates(logits: np.ndarray, top_k: int) -> np.ndarray:
    """ids of the top_k largest logits, largest first; ties by lower id."""
    part = np.argpartition(-logits, top_k - 1)[:top_k]
    return part[np.lexsort((part, -logits[part]))]


def nucleus_candidates(z: np.ndarray, top_p: float, start: int = 64) -> tuple[np.ndarray, float]:
    """Sorted ids of the smallest top slice of z [vocab] holding at least top_p of the probability mass
    (every token that top-p can keep), and the softmax normaliser sum(exp(z - max)) over the whole vocab.
    Grows a partial sort instead of sorting the whole vocabulary."""
    m = np.max(z)
    e = np.exp(z - m)
    total = float(e.sum())
    n = min(start, z.size)
    while True:
        ids = top_candidates(z, n) if n < z.size else np.argsort(-z, kind="stable")
        if n >= z.size or e[ids].sum() / total >= top_p:
            return ids, total
        n = min(4 * n, z.size)


def sample_sorted(values: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
                  total: float | None = None) -> int:
    """Candidate logits sorted largest first -> index of the drawn candidate, after temperature and top-p
    (top-p drops candidates whose preceding cumulative mass already reaches top_p; the first always stays,
    the reference's rule). total: the softmax normaliser sum(exp(z - max)) when the candidates are a slice of
    a larger distribution (default: the candidates are the whole distribution). One uniform number per draw,
    so a seed fixes the whole sequence."""
    z = values / float(temperature)
    e = np.exp(z - z[0])
    probs = e / (e.sum() if total is None else total)
    if top_p < 1.0:
        keep = (np.cumsum(probs) - probs) < top_p
        keep[0] = True
        probs = np.where(keep, probs, 0.0)
    return _draw(probs, rng)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), probs.size - 1))


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()
