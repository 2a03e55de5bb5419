"""LongRoPE ("su"/"longrope") rotary tables for the PyTorch reference.

The factor set is chosen by the TOTAL sequence length (max position + 1): short factors up to
`original_max_position_embeddings`, long beyond. cos and sin are both scaled by
`cfg.rope_attention_factor`. Rotation is the non-interleaved (rotate_half) form.
The rule itself lives in runtime/model_facts.py.

A twin of runtime/rope.py on purpose (the accuracy oracle): tests/test_decoder_export.py
::test_fp32_text_short_and_across_longrope_boundary ties the bundle's tables to these on both sides.
"""
from __future__ import annotations

import torch

from .config import Phi3VConfig


def rope_cos_sin(cfg: Phi3VConfig, position_ids: torch.Tensor, total_length: int | None = None):
    """position_ids [B, S] -> cos, sin [B, S, head_dim] (fp32).

    total_length picks the factor set; by default max(position_ids) + 1 (as the original model does)."""
    dim = cfg.head_dim
    if total_length is None:
        total_length = int(position_ids.max()) + 1
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim  # [dim/2]
    factors = cfg.rope_factors(total_length)
    ext = torch.tensor(factors, dtype=torch.float32, device=position_ids.device) if factors else 1.0
    inv_freq = 1.0 / (ext * cfg.rope_theta ** exponent)  # [dim/2]
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, S, dim]
    scale = cfg.rope_attention_factor
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, hd], cos/sin [B, S, hd] -> rotated x (same dtype as x)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin
