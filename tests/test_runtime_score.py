"""Phi3VRuntime.score: teacher-forced logits, the basis of the quality benchmark's KL figures."""
from __future__ import annotations

import numpy as np
import torch

from phi3v_edge.models.modeling import Phi3VForCausalLM
from phi3v_edge.runtime import Phi3VRuntime

PROMPT = "<|user|>\nName three colors.<|end|>\n<|assistant|>\n"


def test_score_matches_greedy_and_the_reference(tiny_bundle, tiny_checkpoint):
    rt = Phi3VRuntime(tiny_bundle, provider="cpu", max_length=256)
    res = rt.generate(PROMPT, max_new_tokens=6, stop_ids=())
    rows = rt.score(PROMPT, continuation=res.token_ids)
    assert rows.shape == (7, 32064)
    assert rows[:-1].argmax(-1).tolist() == res.token_ids  # teacher forcing on its own greedy path
    ref = Phi3VForCausalLM.from_pretrained(tiny_checkpoint)
    ids = rt.processor(PROMPT).input_ids
    full = np.concatenate([ids[0], res.token_ids])[None]
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(full)).logits[0, ids.shape[1] - 1:].numpy()
    assert np.linalg.norm(rows - want) / np.linalg.norm(want) < 1e-4
    # the runtime is still usable for generation afterwards, and gives the same tokens
    assert rt.generate(PROMPT, max_new_tokens=6, stop_ids=()).token_ids == res.token_ids
