"""Facts of Phi-3.5-vision that models/, export/ and runtime/ all use: one home each. Pure Python (no torch, no numpy).

Token ids (tokenizer.json / generation_config.json):
    BOS 1 (<s>), EOS 2 (</s>), <|endoftext|> 32000 (also the pad id), <|end|> 32007; generation stops at 2, 32000, 32007.
Image geometry (CLIP ViT-L/14-336, 2x2 merge of the 24x24 patch grid):
    a crop is 336x336 pixels -> 12x12 = 144 merged tokens; an HD image of rows x cols crops takes
    (rows*cols + 1) * 144 + 1 + (rows + 1) * 12 tokens (tiles and global view, one separator per line, glb_GN).
LongRoPE ("su" / "longrope"):
    short factors while the total sequence length is <= original_max_position_embeddings, long beyond; cos and sin
    are both scaled by sqrt(1 + ln(max / orig) / ln(orig)); a generation that crosses the boundary recomputes the
    cache with the long factors once (the step whose total length first exceeds orig).
"""
from __future__ import annotations

import math

BOS_ID = 1  # <s>
EOS_ID = 2  # </s>
ENDOFTEXT_ID = 32000  # <|endoftext|>
PAD_ID = ENDOFTEXT_ID  # config.json pad_token_id
END_ID = 32007  # <|end|>
STOP_IDS = (EOS_ID, ENDOFTEXT_ID, END_ID)

CROP_SIZE = 336  # pixels per side of one CLIP crop (ViT-L/14-336)
PATCH_SIZE = 14
MERGED_GRID = CROP_SIZE // PATCH_SIZE // 2  # 12 merged tokens per crop side (24x24 patches, 2x2 merge)
TOKENS_PER_CROP = MERGED_GRID * MERGED_GRID  # 144


def num_image_tokens(rows: int, cols: int) -> int:
    """Placeholder tokens of one image whose HD grid is rows x cols crops of 336 pixels."""
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * MERGED_GRID


def rope_attention_factor(max_position_embeddings: int, original_max_position_embeddings: int) -> float:
    """LongRoPE's scale of cos and sin: sqrt(1 + ln(max/orig) / ln(orig)); 1.0 without context extension."""
    scale = max_position_embeddings / original_max_position_embeddings
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_position_embeddings))


def uses_long_factors(total_length: int, original_max_position_embeddings: int) -> bool:
    """Which LongRoPE factor set a sequence of this total length uses: long beyond the original context."""
    return total_length > original_max_position_embeddings


def crosses_to_long(total_before: int, total_after: int, original_max_position_embeddings: int) -> bool:
    """Whether growing a sequence from total_before to total_after tokens crosses into the long factors (the
    step at which the cache is recomputed once with them)."""
    return (not uses_long_factors(total_before, original_max_position_embeddings)
            and uses_long_factors(total_after, original_max_position_embeddings))
