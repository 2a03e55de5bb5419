"""Phi3VForCausalLM: the PyTorch accuracy reference (image embedding + Phi-3 decoder + generate).

    ids [1, L] (image k's placeholder tokens are -k) + pixel_values [N, crops+1, 3, 336, 336]
      -> embed_tokens(ids clamped at 0), image k's features [T_k, hidden] written where ids == -k
      -> 32 decoder layers (LongRoPE) -> norm -> lm_head -> logits [1, L, vocab]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_weights, resolve_checkpoint
from .config import Phi3VConfig, crosses_to_long
from .decoder import KVCache, Phi3DecoderLayer, RMSNorm, has_flash_attn
from .rope import rope_cos_sin
from .sampling import sample_next
from .vision import Phi3ImageEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, vocab]
    cache: KVCache | None = None


class Phi3VModel(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # [32064, 3072]
        self.vision_embed_tokens = Phi3ImageEmbedding(cfg)
        self.layers = nn.ModuleList(Phi3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Phi3VForCausalLM(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.config = cfg
        self.model = Phi3VModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # [32064, 3072], untied

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, dtype: torch.dtype = torch.float32,
                        attn_implementation: str | None = None, device: str | torch.device = "cpu"):
        path = resolve_checkpoint(checkpoint)
        cfg = Phi3VConfig.from_json(path)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device).to(dtype)
        load_weights(model, path, dtype=dtype)
        model.set_attn_implementation(attn_implementation)
        return model.eval()

    def set_attn_implementation(self, impl: str | None = None) -> None:
        """None picks: FlashAttention-2 if importable on CUDA, else SDPA on CUDA, eager (fp32 math) on CPU."""
        dev = next(self.parameters()).device
        if impl is None:
            if dev.type == "cuda":
                impl = "flash_attention_2" if has_flash_attn() else "sdpa"
            else:
                impl = "eager"
        if impl not in ("eager", "sdpa", "flash_attention_2"):
            raise ValueError(f"attn_implementation {impl!r}: use 'eager', 'sdpa' or 'flash_attention_2'")
        for layer in self.model.layers:
            layer.self_attn.attn_implementation = impl

    # ---- forward -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None) -> torch.Tensor:
        """input_ids [1, L] with -k at image k's placeholder positions -> inputs_embeds [1, L, hidden]."""
        emb = self.model.embed_tokens(input_ids.clamp_min(0))
        if pixel_values is None:
            if (input_ids < 0).any():
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            return emb
        feats = self.model.vision_embed_tokens(pixel_values.to(emb.dtype), image_sizes)
        emb = emb.clone()
        for k, f in enumerate(feats, start=1):
            pos = input_ids == -k
            n = int(pos.sum())
            if n != f.shape[0]:
                raise ValueError(f"image {k} has {f.shape[0]} feature tokens but {n} placeholder positions")
            emb[pos] = f.to(emb.dtype)
        return emb

    def decode(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None,
               total_length: int | None = None) -> torch.Tensor:
        """inputs_embeds [B, S, hidden] at position_ids [B, S] -> logits [B, S, vocab]."""
        cos, sin = rope_cos_sin(self.config, position_ids, total_length)
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        return self.lm_head(self.model.norm(x))

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values=None, image_sizes=None,
                inputs_embeds=None, cache: KVCache | None = None) -> CausalLMOutput:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        past = cache.length if cache is not None else 0
        s = inputs_embeds.shape[1]
        pos = torch.arange(past, past + s, device=inputs_embeds.device)[None]
        return CausalLMOutput(self.decode(inputs_embeds, pos, cache), cache)

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop_ids=None, use_cache: bool = True) -> list[int]:
        """Greedy or sampled generation; returns the new token ids (a stop id, if hit, included last).

        LongRoPE: while the total length stays <= original_max_position_embeddings the keys are rotated
        with the short factors; at the step that crosses it the whole sequence is recomputed (cache
        rebuilt with the long factors), so cached and uncached decoding give the same tokens."""
        cfg = self.config
        stop = set(cfg.stop_ids if stop_ids is None else stop_ids)
        gen = torch.Generator(device=input_ids.device)
        if seed is not None:
            gen.manual_seed(seed)
        embeds = self.embed(input_ids, pixel_values, image_sizes)  # [1, L, hidden]: the whole sequence so far
        cache = KVCache(cfg.num_hidden_layers) if use_cache else None
        logits = self(inputs_embeds=embeds, cache=cache).logits[:, -1]
        out: list[int] = []
        orig = cfg.original_max_position_embeddings
        for _ in range(max_new_tokens):
            tok = sample_next(logits[0].float(), do_sample, temperature, top_k, top_p, gen)
            out.append(tok)
            if tok in stop or len(out) == max_new_tokens:
                break
            new = self.model.embed_tokens(torch.tensor([[tok]], device=input_ids.device))
            embeds = torch.cat([embeds, new], dim=1)
            total = embeds.shape[1]
            crossing = cfg.rope_type is not None and crosses_to_long(total - 1, total, orig)
            if not use_cache or crossing:  # full recompute (always when uncached; once at the crossing)
                cache = KVCache(cfg.num_hidden_layers) if use_cache else None
                logits = self(inputs_embeds=embeds, cache=cache).logits[:, -1]
            else:
                logits = self(inputs_embeds=new, cache=cache).logits[:, -1]
        return out
