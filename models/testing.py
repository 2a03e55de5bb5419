"""Small random checkpoints in the real layout, for tests and dry runs.

Real key names, a config.json with a small `img_processor.vision_config`, bf16 shards + index, the
real tokenizer and processor files. Norm weights, separators and biases are random (not 1/0) so
that a swapped or forgotten tensor changes the output.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from ..runtime.model_facts import CROP_SIZE, PATCH_SIZE
from .config import ASSETS_DIR, Phi3VConfig


def tiny_config(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int | None = None,
                intermediate_size: int = 128, vision_hidden: int = 32, vision_layers: int = 2, vision_heads: int = 2,
                original_max_position_embeddings: int = 4096, max_position_embeddings: int = 131072,
                rope: bool = True) -> Phi3VConfig:
    """The real config.json with narrow, shallow sizes (vocab, tokenizer and 336/14 crops unchanged)."""
    d = Phi3VConfig.phi35v().raw
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    d.update(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
             num_key_value_heads=num_kv_heads or num_heads, intermediate_size=intermediate_size,
             original_max_position_embeddings=original_max_position_embeddings,
             max_position_embeddings=max_position_embeddings)
    if rope:
        # distinct short/long sets so that using the wrong one shows
        d["rope_scaling"] = {"type": "su", "short_factor": [1.0 + 0.25 * i for i in range(half)],
                             "long_factor": [1.0 + 4.0 * i for i in range(half)]}
    else:
        d["rope_scaling"] = None
    d["img_processor"] = dict(d["img_processor"], image_dim_out=vision_hidden, vision_config=dict(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=CROP_SIZE, patch_size=PATCH_SIZE))
    return Phi3VConfig.from_dict(d)


def random_state_dict(cfg: Phi3VConfig, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """fp32 random weights for every parameter of Phi3VForCausalLM(cfg)."""
    from .modeling import Phi3VForCausalLM

    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight",
                          "pre_layrnorm.weight")):
            t = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
        elif name.endswith(("GN", "class_embedding")):
            t = torch.randn(p.shape, generator=g)
        elif name.endswith("embed_tokens.weight") or name.endswith("position_embedding.weight"):
            t = 0.5 * torch.randn(p.shape, generator=g)
        else:
            t = std * torch.randn(p.shape, generator=g)
        state[name] = t
    return state


def write_tiny_checkpoint(directory: str | Path, cfg: Phi3VConfig | None = None, seed: int = 0,
                          max_shard_bytes: int = 4 * 1024 ** 2, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random checkpoint in the real HF layout (sharded bf16 + index by default)."""
    cfg = cfg or tiny_config()
    state = random_state_dict(cfg, seed)
    return save_checkpoint(state, directory, config=cfg, dtype=dtype, max_shard_bytes=max_shard_bytes,
                           side_files_from=ASSETS_DIR)
