"""The Phi-3-mini decoder of the PyTorch reference, with an explicit per-layer KV cache.

Written out rather than taken from transformers' Phi3 so the LongRoPE boundary rule (recompute the
cache with long factors when the total length crosses original_max_position_embeddings) is ours
to state and test; the tests hold it against transformers' Phi3ForCausalLM below the boundary.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from .config import Phi3VConfig
from .rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Per-layer keys and values [B, kv_heads, T, head_dim], grown by concatenation (reference only:
    the runtime preallocates max_length instead). A twin of runtime/kv_cache.py on purpose (the accuracy
    oracle): tests/test_runtime.py::test_longrope_crossing_matches_reference ties them across the boundary."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attn_usable(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and has_flash_attn()


class Phi3Attention(nn.Module):
    def __init__(self, cfg: Phi3VConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=False)  # [9216, 3072]: Q|K|V
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)  # [3072, 3072]
        self.attn_implementation = "eager"

    def forward(self, x, cos, sin, cache: KVCache | None):
        cfg = self.cfg
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(b, s, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = k.view(b, s, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)  # [B, KV, S, hd]
        v = v.view(b, s, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        t = k.shape[2]
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        impl = self.attn_implementation
        if impl == "flash_attention_2" and _flash_attn_usable(q):
            from flash_attn import flash_attn_func

            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # [B, S, H, hd]
            return self.o_proj(o.reshape(b, s, -1))
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # causal mask for queries at positions t-s .. t-1 over keys 0 .. t-1
        mask = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(diagonal=t - s)
        if impl == "eager":
            att = (q.float() @ k.float().transpose(-1, -2)) * cfg.head_dim ** -0.5
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            o = (att @ v.float()).to(q.dtype)
        else:  # sdpa
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


class Phi3MLP(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # [16384, 3072]: gate|up
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # [3072, 8192]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3VConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Phi3Attention(cfg, layer_idx)
        self.mlp = Phi3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
