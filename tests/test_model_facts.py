"""One home for each model fact (issue 16): runtime/model_facts.py defines them; models/, export/ and runtime/ import."""
from __future__ import annotations

import math
import re
from pathlib import Path

from phi3v_edge.runtime import image_layout, model_facts, rope, tokenizer
from phi3v_edge.runtime.image_transform import num_image_tokens_for

ROOT = Path(__file__).resolve().parents[1]
# an assignment of one of the facts' values to a name, or the attention-factor formula, or the crossing test
DEFINITION = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=\s*(336|144|32007|32000|\(2, 32000, 32007\))\s*(#.*)?$"
                        r"|math\.log\(.*original_max|<= orig <")


def test_each_fact_is_defined_once():
    hits = []
    for folder in ("models", "export", "runtime"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if DEFINITION.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits and all(h.startswith("runtime/model_facts.py:") for h in hits), "\n".join(hits)


def test_the_facts_and_their_users_agree():
    from phi3v_edge.models.config import NUM_IMG_TOKENS_PER_CROP, STOP_IDS, Phi3VConfig

    assert model_facts.STOP_IDS == (2, 32000, 32007) == STOP_IDS == tokenizer.STOP_IDS
    assert model_facts.TOKENS_PER_CROP == 144 == NUM_IMG_TOKENS_PER_CROP == image_layout.TOKENS_PER_CROP
    assert image_layout.CROP == 336 and image_layout.num_image_tokens is model_facts.num_image_tokens
    assert model_facts.num_image_tokens(2, 3) == (6 + 1) * 144 + 1 + 3 * 12
    assert num_image_tokens_for(672, 336, 4) == model_facts.num_image_tokens(1, 2)
    cfg = Phi3VConfig.phi35v()
    want = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    assert cfg.rope_attention_factor == want
    manifest_rope = {"type": "longrope", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096}
    assert rope.attention_factor(manifest_rope) == want
    assert rope.needs_long(manifest_rope, 4097) and not rope.needs_long(manifest_rope, 4096)
    assert model_facts.crosses_to_long(4096, 4097, 4096) and not model_facts.crosses_to_long(4097, 4098, 4096)
    assert cfg.rope_factors(4096) == cfg.rope_short_factor and cfg.rope_factors(4097) == cfg.rope_long_factor
