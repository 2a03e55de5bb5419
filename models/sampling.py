"""Next-token choice for the PyTorch reference: greedy, or temperature -> top-k -> top-p sampling.

A twin of runtime/sampler.py on purpose (the accuracy oracle): greedy choices are tied to the runtime by
tests/test_runtime.py::test_text_prompt_matches_reference; sampled draws use torch's RNG, so they are not.
"""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> int:
    """logits [vocab] (fp32) -> token id."""
    if not do_sample or temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop tokens whose preceding cumulative mass already reaches top_p (always keep the first)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.index_fill(0, idx[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
