"""LongRoPE cos/sin tables for the decoder's GroupQueryAttention (the runtime owns the short/long choice). Torch-free.

Short factors while the total sequence length is <= original_max_position_embeddings, long beyond;
both tables scaled by the attention factor sqrt(1 + ln(max/orig) / ln(orig)).
"""
from __future__ import annotations

import numpy as np

from .model_facts import rope_attention_factor, uses_long_factors


def attention_factor(rope: dict) -> float:
    """The manifest's `rope.attention_factor` (load_manifest checks it against the rule in model_facts), or the
    rule itself for a `rope` section without it; 1.0 without LongRoPE."""
    if not rope.get("type"):
        return 1.0
    if "attention_factor" in rope:
        return float(rope["attention_factor"])
    return rope_attention_factor(rope["max_position_embeddings"], rope["original_max_position_embeddings"])


def cos_sin_tables(rope: dict, head_dim: int, max_length: int, long: bool, dtype=np.float32):
    """-> cos, sin [max_length, head_dim/2] for positions 0..max_length-1 (the manifest's `rope` section)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # [hd/2], fp32 as the reference
    if rope.get("type"):
        factors = np.asarray(rope["long_factor" if long else "short_factor"], dtype=np.float32)
    else:
        factors = np.float32(1.0)
    inv_freq = (np.float32(1.0) / (factors * np.float32(rope["theta"]) ** exponent)).astype(np.float32)
    freqs = np.arange(max_length, dtype=np.float32)[:, None] * inv_freq[None, :]  # [M, hd/2]
    f = np.float32(attention_factor(rope))
    return (np.cos(freqs) * f).astype(dtype), (np.sin(freqs) * f).astype(dtype)


def needs_long(rope: dict, total_length: int) -> bool:
    """Which factor set a sequence of this total length uses."""
    return bool(rope.get("type")) and uses_long_factors(total_length, rope["original_max_position_embeddings"])


def stacked_tables(rope: dict, head_dim: int, max_length: int, dtype=np.float32):
    """The decoder's cos_cache / sin_cache [2 * max_length, head_dim/2]: the short-factor table (rows 0..M-1)
    then the long-factor one (rows M..2M-1), so each batch row picks its factor set by its position_ids."""
    short = cos_sin_tables(rope, head_dim, max_length, False, dtype)
    long = cos_sin_tables(rope, head_dim, max_length, True, dtype)
    return np.concatenate([short[0], long[0]]), np.concatenate([short[1], long[1]])


def table_rows(positions, long: bool, max_length: int) -> np.ndarray:
    """position_ids for these positions: p under the short factors, max_length + p under the long ones."""
    return np.asarray(positions, dtype=np.int64) + (max_length if long else 0)
