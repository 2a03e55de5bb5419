"""The image side of the PyTorch reference: CLIP tower, 2x2 merge, HD layout with separators, projector.

Written out (not transformers' CLIPVisionModel) so that the reference computes exactly the layers it
uses (hidden_states[-2]: the last CLIP layer is never run) and has no transformers dependency; the
tests hold it against transformers' CLIPVisionModel on the same weights.
Key names follow the checkpoint: `img_processor.vision_model.*` (HF CLIP), `img_projection.{0,2}`,
`glb_GN`, `sub_GN` under `model.vision_embed_tokens.`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CROP_SIZE, Phi3VConfig, VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        d = vc.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(d))  # [D]
        self.patch_embedding = nn.Conv2d(vc.num_channels, d, vc.patch_size, vc.patch_size, bias=False)  # [D,3,14,14]
        self.num_positions = vc.num_patches_per_side ** 2 + 1  # 577
        self.position_embedding = nn.Embedding(self.num_positions, d)  # [577, D]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values [B, 3, 336, 336] -> [B, 577, D]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, 24, 24]
        x = x.flatten(2).transpose(1, 2)  # [B, 576, D]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight[None]


class CLIPAttention(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        d = vc.hidden_size
        self.heads, self.head_dim = vc.num_attention_heads, vc.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, hd], no mask (full attention)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, -1))


class CLIPMLP(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(vc.hidden_size, vc.intermediate_size)
        self.fc2 = nn.Linear(vc.intermediate_size, vc.hidden_size)
        self.act = quick_gelu if vc.hidden_act == "quick_gelu" else nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(vc)
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = CLIPMLP(vc)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(vc) for _ in range(vc.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(vc)
        self.pre_layrnorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)  # sic: HF CLIP spelling
        self.encoder = CLIPEncoder(vc)
        self.post_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)  # stored, unused by Phi-3.5-v

    def penultimate(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """hidden_states[-2] of HF CLIP: the output of all layers but the last. [B, 577, D]"""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:-1]:
            x = layer(x)
        return x


class CLIPVisionModel(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(vc)


def merge_2x2(x: torch.Tensor, side: int) -> torch.Tensor:
    """[B, side*side, C] patch features -> [B, side/2, side/2, 4C]; the 4C vector is
    (row0 col0 | row0 col1 | row1 col0 | row1 col1) of each 2x2 block."""
    b, _, c = x.shape
    x = x.reshape(b, side // 2, 2, side // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, side // 2, side // 2, 4 * c)


class Phi3ImageEmbedding(nn.Module):
    """Crops -> image tokens [T, hidden]: CLIP, 2x2 merge, HD layout in sub_glb order, MLP projector."""

    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.cfg = cfg
        self.img_processor = CLIPVisionModel(cfg.vision)
        m = cfg.merged_dim
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, m))  # [1, 1, 4096] separator before the global view
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, m))  # [1, 1, 1, 4096] end-of-row separator
        self.img_projection = nn.Sequential(nn.Linear(m, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size))

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [B, 3, 336, 336] -> [B, 12, 12, 4096] merged patch features (CLS dropped)."""
        feats = self.img_processor.vision_model.penultimate(crops)[:, 1:]
        return merge_2x2(feats, self.cfg.vision.num_patches_per_side)

    def layout(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """merged [1 + rows*cols, 12, 12, 4C] (global view first) -> [T, 4C] in sub_glb order:
        sub-image grid (12*rows lines of 12*cols tokens, each line ending in sub_GN), glb_GN,
        global view (12 lines of 12 tokens + sub_GN)."""
        g = merged.shape[1]
        sub_gn = self.sub_GN.to(merged.dtype)
        glb = torch.cat([merged[:1], sub_gn.expand(1, g, 1, -1)], dim=2).reshape(-1, merged.shape[-1])
        sub = merged[1:1 + rows * cols].reshape(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1)
        sub = torch.cat([sub, sub_gn[0].expand(rows * g, 1, -1)], dim=1).reshape(-1, merged.shape[-1])
        return torch.cat([sub, self.glb_GN[0].to(merged.dtype), glb], dim=0)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N, crops+1, 3, 336, 336], image_sizes [N, 2] (padded h, w) -> N tensors [T_i, hidden]."""
        out = []
        for i in range(pixel_values.shape[0]):
            h, w = (int(v) // CROP_SIZE for v in image_sizes[i])
            merged = self.crop_features(pixel_values[i, : 1 + h * w])
            out.append(self.img_projection(self.layout(merged, h, w)))
        return out
