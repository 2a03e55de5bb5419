"""Train the small demo model (models/demo/checkpoint) on the synthetic picture Q&A of demo_data.

    python -m phi3v_edge.models.train_demo --out models/demo/checkpoint

(the defaults are the committed checkpoint's settings: 2200 steps at lr 2e-3, a pool of 2000 images,
PCA patch init, per-token targets, attention targets and answer-row probes on, the scene-attribute
heads off; --eval-every N adds teacher-forced held-out checks, whose time counts against --minutes).

Exact Phi-3.5-vision architecture and key names (real 32064 vocab and tokenizer, LongRoPE, HD
transform with 336-px crops and 14-px patches, CLIP tower, 2x2 merge, separators, MLP projector,
Phi-3 decoder), narrow and shallow (DEMO_SIZES). PyTorch on 2 CPU threads, seeded; a fixed number
of steps (--steps) so that a run is reproducible, with --minutes as a wall-clock safety cap.

Speed tricks (training only; the model is unchanged):
- the images are generated and processed once (Phi3VProcessor, fp16 in memory) into a pool of scenes;
- "shared-prefix packing": one sequence holds the image prefix once and several question/answer
  branches after it; each branch attends to the prefix and to itself only (block mask) and its
  positions continue from the prefix, so each branch sees exactly what a separate sequence would
  (checked at start-up against the model's own forward);
- the loss is computed only at the answer tokens + <|end|> (lm_head applied to those rows only).

Training-only help for the image side (nothing of it is saved; the model and its keys are unchanged):
- a scene-attribute loss (SceneHeads, --scene-weight): a linear probe on the mean of each image's
  projected tokens predicts the scene's color, shape, count and (one object) left/right, top/bottom;
- the CLIP position embeddings start as a 2D sin/cos table (--sincos-pos) instead of N(0, 1);
- the patch embedding starts as the whitened top principal components of pool patches (--pca-init);
- per-token targets (DenseHeads, --dense-weight): every projected image token predicts its cell's
  object cover, center-dot share, its own position (covered cells), color and (outline cells) shape,
  from the dense labels of demo_labels;
- attention targets (--attn-weight): the first decoder layer's 4 heads are told where the answer rows
  should look (the covered cells / BOS + object centers of the first and last image's global view);
- answer-row probes (AnswerProbes, --probe-weight): after the first decoder layer, the answer rows
  must hold the color, shape and count of the first and of the last image (and a one-object last
  image's side) in linearly readable form, and for two images already the comparisons.
  (--aux-frac > 0, off by default, experimental: the first fraction of the steps also trains
  next-token prediction on the question text, at weight --aux-weight.)

At the end the checkpoint is written in the Hugging Face layout (bf16 safetensors, config.json,
tokenizer and processor files, preprocessor_config.json with num_crops = demo_data.NUM_CROPS), reloaded
with Phi3VForCausalLM.from_pretrained, and the held-out exact-answer accuracy of greedy generate()
is printed (and written to <out>/../eval.json).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import demo_data
from .demo_labels import dense_labels
from .checkpoint import save_checkpoint
from .config import ASSETS_DIR, Phi3VConfig
from .modeling import Phi3VForCausalLM
from .rope import apply_rope, rope_cos_sin
from ..runtime.image_layout import layout_index
from ..runtime.model_facts import CROP_SIZE, END_ID, PAD_ID, PATCH_SIZE, TOKENS_PER_CROP

# narrow and shallow; vocab, tokenizer, crop/patch sizes and LongRoPE lengths stay the real ones
DEMO_SIZES = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                  vision_hidden_size=32, vision_layers=3, vision_heads=2, vision_intermediate_size=128)


def demo_config(hidden_size: int = 128, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                intermediate_size: int = 256, vision_hidden_size: int = 32, vision_layers: int = 3,
                vision_heads: int = 2, vision_intermediate_size: int = 128) -> Phi3VConfig:
    """The real config.json with demo sizes. LongRoPE kept: the real short/long factors, every k-th
    one so that there are head_dim/2 of them (head_dim 24 -> every 4th of the 48); lengths unchanged.
    The CLIP tower runs vision_layers - 1 layers (hidden_states[-2]); its last layer is stored unused."""
    d = Phi3VConfig.phi35v().raw
    head_dim = hidden_size // num_attention_heads
    rs = d["rope_scaling"]
    n_real = len(rs["short_factor"])
    step = n_real // (head_dim // 2)
    if step * (head_dim // 2) != n_real:
        raise ValueError(f"head_dim {head_dim}: head_dim/2 must divide {n_real}")
    d.update(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
             num_key_value_heads=num_attention_heads, intermediate_size=intermediate_size,
             _name_or_path="phi3v-edge-demo")
    d.pop("_attn_implementation", None)
    d["rope_scaling"] = {"type": rs["type"], "short_factor": rs["short_factor"][::step],
                         "long_factor": rs["long_factor"][::step]}
    d["img_processor"] = dict(d["img_processor"], image_dim_out=vision_hidden_size, vision_config=dict(
        hidden_size=vision_hidden_size, intermediate_size=vision_intermediate_size, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=CROP_SIZE, patch_size=PATCH_SIZE, hidden_act="quick_gelu", layer_norm_eps=1e-5))
    return Phi3VConfig.from_dict(d)


def init_weights(model: Phi3VForCausalLM, seed: int) -> None:
    """GPT-style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers), norms 1,
    biases 0; small random separators and CLIP class/position embeddings."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm scales
                p.fill_(1.0)
                continue
            if name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, 0.02 / math.sqrt(2 * n_layers), generator=g)
            elif "patch_embedding" in name:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)


def init_vision_positions(model: Phi3VForCausalLM, scale: float = 0.5) -> None:
    """Structured init of the CLIP tower's learned position embeddings (the parameter is unchanged):
    a 2D sine/cosine table (half the channels for the column, half for the row; the class position 0),
    so that "where in the crop" is a linear function of the embedding from step 0. PyTorch's default
    N(0, 1) gives 576 unrelated vectors, each of which must be learned from the few objects covering it."""
    emb = model.model.vision_embed_tokens.img_processor.vision_model.embeddings
    d = emb.position_embedding.weight.shape[1]
    side = int(round((emb.num_positions - 1) ** 0.5))
    q = d // 4
    freqs = 1.0 / (side ** (torch.arange(q, dtype=torch.float32) / max(1, q - 1)))  # 1 ... 1/side rad per patch
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    ang_x, ang_y = xs.flatten()[:, None] * freqs * math.pi / 2, ys.flatten()[:, None] * freqs * math.pi / 2
    table = torch.cat([ang_x.sin(), ang_x.cos(), ang_y.sin(), ang_y.cos()], dim=1)  # [side*side, 4q]
    with torch.no_grad():
        emb.position_embedding.weight.zero_()
        emb.position_embedding.weight[1:, : 4 * q] = scale * table


def init_patch_pca(model: Phi3VForCausalLM, pool: list["PoolImage"], n_patches: int = 40000, seed: int = 0) -> None:
    """Data-dependent init of the CLIP patch embedding (the parameter is unchanged): its D filters become
    the top-D principal components of 14x14x3 pixel patches drawn from the training pool, each scaled to
    unit output variance (PCA whitening, a classic first-layer init). From step 0 the tower then sees
    an information-preserving summary of each patch (its mean color first, then edges and gradients)
    instead of D random projections, which a few hundred steps of a tiny tower cannot undo."""
    conv = model.model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding
    d, c, p, _ = conv.weight.shape
    g = torch.Generator().manual_seed(seed)
    views = torch.cat([im.crops for im in pool[:400]])  # [V, 3, 336, 336]
    side = views.shape[-1] // p
    pick = torch.randint(0, views.shape[0] * side * side, (n_patches,), generator=g)
    v, rest = pick // (side * side), pick % (side * side)
    grid = views.view(views.shape[0], c, side, p, side, p)  # [V, 3, row, y, col, x], no copy
    patches = grid[v, :, rest // side, :, rest % side].float().flatten(1)  # [n, 3, p, p] -> [n, 3*p*p]
    x = patches - patches.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / len(x))  # ascending
    top = evecs[:, -d:].flip(-1).T  # [D, 3*p*p], largest first
    scale = evals[-d:].flip(0).clamp(min=1e-4).rsqrt()[:, None]
    with torch.no_grad():
        conv.weight.copy_((top * scale).view(d, c, p, p))


# --------------------------------------------------------------------------------------- data pool
@dataclass
class PoolImage:
    crops: torch.Tensor  # [1 + rows*cols, 3, 336, 336] fp16 (valid crops only, global view first)
    grid: tuple[int, int]  # (rows, cols)
    tokens: int  # placeholder tokens
    scene: demo_data.Scene
    labels: torch.Tensor | None = None  # [1 + rows*cols, 12, 12, 4] dense per-token targets (demo_labels)


def process_image(proc, image) -> tuple[torch.Tensor, tuple[int, int], int]:
    out = proc("<|image_1|>", images=[image])
    h, w = (int(v) for v in out.image_sizes[0])
    rows, cols = h // CROP_SIZE, w // CROP_SIZE
    return torch.from_numpy(out.pixel_values[0, : 1 + rows * cols]), (rows, cols), int(out.num_img_tokens[0])


def build_pool(proc, n: int, rng: np.random.Generator) -> list[PoolImage]:
    pool = []
    for _ in range(n):
        scene = demo_data.make_scene(rng)
        crops, grid, tokens = process_image(proc, scene.image)
        labels = torch.from_numpy(dense_labels(scene.image, [o[:2] for o in scene.objects], demo_data.NUM_CROPS))
        scene.image = None  # keep only the facts; the pixels live in crops
        pool.append(PoolImage(crops.half(), grid, tokens, scene, labels))
    return pool


# ------------------------------------------------------------------------------ packed sequences
@dataclass
class Branch:
    prompt: list[int]  # the text after the last image: BOS + "\n" + question + <|end|>\n<|assistant|>\n
    target: list[int]  # answer tokens + <|end|>
    task: str


@dataclass
class Group:
    """Images + prefix ids (ending with the last image's placeholders) + question/answer branches."""
    images: list  # per image: crops tensor [c, 3, 336, 336] (any float dtype)
    grids: list[tuple[int, int]]
    prefix: list[int]
    branches: list[Branch]
    scenes: list | None = None  # per image: the demo_data.Scene (training pool only; for the auxiliary loss)
    labels: list | None = None  # per image: dense per-token targets (training pool only)


class Tokens:
    """Prompt ids through the processor's own tokenize(); split into the shared prefix and the branch."""

    def __init__(self, proc):
        self.proc = proc
        self._answer: dict[str, list[int]] = {}

    def split(self, question: str, tokens: list[int]) -> tuple[list[int], list[int]]:
        ex = {"images": [None] * len(tokens), "question": question}
        ids = self.proc.tokenize(demo_data.prompt(ex), tokens)[0].tolist()
        last = max(i for i, t in enumerate(ids) if t < 0)
        return ids[: last + 1], ids[last + 1:]

    def answer(self, answer: str) -> list[int]:
        if answer not in self._answer:
            self._answer[answer] = self.proc.tokenizer.encode(answer, bos=False) + [END_ID]
        return self._answer[answer]

    def check(self) -> None:
        """prompt ids + answer ids == the processor's ids of prompt + answer + <|end|> (one string)."""
        for a in demo_data.ANSWERS:
            for q, t in (("What shape is shown?", [313]), ("Do both images have the same color?", [313, 457])):
                pre, br = self.split(q, t)
                ex = {"images": [None] * len(t), "question": q}
                full = self.proc.tokenize(demo_data.prompt(ex) + a + "<|end|>", t)[0].tolist()
                if pre + br + self.answer(a) != full:
                    raise AssertionError(f"answer {a!r} does not tokenize the same after the prompt")


def group_for(tok: Tokens, images: list[PoolImage], qas: list[tuple[str, str, str]], dtype=None) -> Group:
    prefix = None
    branches = []
    for task, q, a in qas:
        pre, br = tok.split(q, [im.tokens for im in images])
        assert prefix is None or pre == prefix
        prefix = pre
        branches.append(Branch(br, tok.answer(a), task))
    return Group([im.crops for im in images], [im.grid for im in images], prefix, branches,
                 [im.scene for im in images], [im.labels for im in images])


def collate(groups: list[Group], aux: bool = False):
    """-> ids [B, S], positions [B, S], mask [B, 1, S, S] (True = may attend), labels [B, S] (-100 =
    no loss; else the token that should follow this position), branch index [B, S] (-1 = none)."""
    lens = [len(g.prefix) + sum(len(b.prompt) + len(b.target) for b in g.branches) for g in groups]
    B, S = len(groups), max(lens)
    ids = torch.full((B, S), PAD_ID, dtype=torch.long)
    pos = torch.zeros((B, S), dtype=torch.long)
    mask = torch.zeros((B, S, S), dtype=torch.bool)
    labels = torch.full((B, S), -100, dtype=torch.long)
    bidx = torch.full((B, S), -1, dtype=torch.long)
    tasks = []
    for b, g in enumerate(groups):
        p = len(g.prefix)
        ids[b, :p] = torch.tensor(g.prefix)
        pos[b, :p] = torch.arange(p)
        mask[b, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        o = p
        for br in g.branches:
            seq = br.prompt + br.target
            n = len(seq)
            ids[b, o:o + n] = torch.tensor(seq)
            pos[b, o:o + n] = torch.arange(p, p + n)
            mask[b, o:o + n, :p] = True
            mask[b, o:o + n, o:o + n] = torch.ones(n, n, dtype=torch.bool).tril()
            t0 = o + len(br.prompt) - 1  # this position predicts the first target token
            if aux:  # next-token targets inside the question text (auxiliary, early training only)
                labels[b, o:t0] = torch.tensor(seq[1:len(br.prompt)])
            labels[b, t0:t0 + len(br.target)] = torch.tensor(br.target)
            bidx[b, t0:t0 + len(br.target)] = len(tasks)
            tasks.append(br.task)
            o += n
        for i in range(o, S):  # padding rows attend to themselves only (no NaN); their outputs are unused
            mask[b, i, i] = True
    return ids, pos, mask[:, None], labels, bidx, tasks


def image_features(model: Phi3VForCausalLM, groups: list[Group], lens: list | None = None,
                   cells: list | None = None) -> torch.Tensor:
    """Every image of every group, in order -> [sum T, hidden] (vision tower run once on all crops);
    the token count of each image is appended to `lens` if given, and the projected tokens of every
    view without separators [C, 12, 12, hidden] to `cells`."""
    emb = model.model.vision_embed_tokens
    crops = torch.cat([c for g in groups for c in g.images]).float()
    merged = emb.crop_features(crops)  # [C, 12, 12, 4 * vision_hidden]
    if cells is not None:
        cells.append(emb.img_projection(merged))
    feats, i = [], 0
    for g in groups:
        for c, (r, col) in zip(g.images, g.grids):
            feats.append(emb.layout(merged[i:i + c.shape[0]], r, col))
            if lens is not None:
                lens.append(feats[-1].shape[0])
            i += c.shape[0]
    return emb.img_projection(torch.cat(feats))


def global_view_positions(ids: torch.Tensor, image: int, grid: tuple[int, int]) -> torch.Tensor:
    """Sequence positions of the 144 global-view cells of image `image` (1-based), in cell order
    [12 * 12]; from the runtime's layout_index, the same token order vision.onnx produces."""
    pos = (ids == -image).nonzero()[:, 0]  # this image's placeholder positions, in layout order
    idx = torch.from_numpy(layout_index([grid]))  # crop 0 is the global view: rows < 144 are its cells
    cells = idx < TOKENS_PER_CROP
    out = torch.empty(TOKENS_PER_CROP, dtype=torch.long)
    out[idx[cells]] = pos[cells]
    return out


def attention_targets(groups: list[Group], ids: torch.Tensor) -> torch.Tensor:
    """[B, 4, S] target distributions for the 4 heads of the first decoder layer at the answer rows
    (training only): head 0 spreads over the covered cells of the first image's global view (by cover),
    head 1 the same for the last image; heads 2 and 3 over BOS (weight 1) and the object centers of the
    first / last image's global view (center-dot shares; they sum to the count), so that the share left
    on BOS reads the count. From the dense labels of the pool."""
    B, S = ids.shape
    t = torch.zeros(B, 4, S)
    for b, g in enumerate(groups):
        for head, k in ((0, 1), (1, len(g.images)), (2, 1), (3, len(g.images))):
            pos = global_view_positions(ids[b], k, g.grids[k - 1])
            lab = g.labels[k - 1][0].flatten(0, 1)  # [144, 4] global view, cell order
            if head < 2:
                t[b, head, pos] = lab[:, 0]
            else:
                t[b, head, 0] = 1.0
                t[b, head, pos] = lab[:, 1]
        t[b] /= t[b].sum(-1, keepdim=True).clamp(min=1e-6)
    return t


def packed_forward(model: Phi3VForCausalLM, groups: list[Group], aux: bool = False, image_means: bool = False,
                   attn_loss: bool = False):
    """-> logits at the labelled rows [N, vocab], labels [N], branch index [N] (-1: an auxiliary
    question-text row, only with aux=True), tasks (+ with image_means=True: the mean of each image's
    projected tokens [n_images, hidden], what a uniform attention over the image would read)."""
    cfg = model.config
    ids, pos, mask, labels, bidx, tasks = collate(groups, aux)
    x = model.model.embed_tokens(ids.clamp_min(0))
    img = ids < 0
    lens: list[int] = []
    cells: list = []
    feats = image_features(model, groups, lens, cells if image_means else None)
    x = x.masked_scatter(img[..., None], feats.to(x.dtype))
    cos, sin = rope_cos_sin(cfg, pos)
    B, S, _ = x.shape
    a_loss = None
    for li, layer in enumerate(model.model.layers):
        a = layer.self_attn
        q, k, v = a.qkv_proj(layer.input_layernorm(x)).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(B, S, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(B, S, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(B, S, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn_loss and li == 0:  # explicit attention, to supervise where the answer rows look
            rows_b, rows_s = (labels >= 0).nonzero(as_tuple=True)
            logp = (q[rows_b, :, rows_s][:, :, None] @ k[rows_b].transpose(-1, -2))[:, :, 0] / math.sqrt(cfg.head_dim)  # [N, H, S]
            logp = logp.masked_fill(~mask[rows_b, 0, rows_s][:, None], float("-inf")).log_softmax(-1)
            tgt = attention_targets(groups, ids)[rows_b]  # [N, 4, S]
            a_loss = -(tgt * logp[:, :4].clamp(min=-1e4)).sum(-1).mean()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, S, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        if li == 0:
            mid = x[labels >= 0]  # [N, hidden] the answer rows after the first layer (AnswerProbes)
    rows = labels >= 0
    logits = model.lm_head(model.model.norm(x[rows]))
    if image_means:
        return logits, labels[rows], bidx[rows], tasks, feats.split(lens), cells[0], a_loss, (mid, rows.nonzero()[:, 0])
    return logits, labels[rows], bidx[rows], tasks


class SceneHeads(torch.nn.Module):
    """Training-only linear probes (never saved) on the mean of an image's projected tokens: color (6),
    shape (3), count (4), and for one-object scenes horizontal (2) and vertical (2) position. They give
    the image side a direct, dense signal; the mean is what the answer position reads while the
    decoder's attention over the image is still near-uniform."""

    SPLITS = (len(demo_data.COLORS), len(demo_data.SHAPES), demo_data.MAX_OBJECTS, 2, 2)

    def __init__(self, hidden: int, queries: int = 0):
        super().__init__()
        self.queries = queries
        if queries:  # attention pooling: `queries` learned queries over the image's tokens, like a decoder head
            self.key = torch.nn.Linear(hidden, queries)
        self.head = torch.nn.Linear(hidden * max(1, queries), sum(self.SPLITS))
        self.colors = list(demo_data.COLORS)

    def pool(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if not self.queries:
            return torch.stack([f.mean(0) for f in feats])
        return torch.stack([(self.key(f).softmax(0).T @ f).flatten() for f in feats])

    def forward(self, feats: list[torch.Tensor], scenes: list) -> tuple[torch.Tensor, dict]:
        col, shp, cnt, hor, ver = self.head(self.pool(feats).float()).split(self.SPLITS, dim=-1)
        y_col = torch.tensor([self.colors.index(s.color) for s in scenes])
        y_shp = torch.tensor([demo_data.SHAPES.index(s.shape) for s in scenes])
        y_cnt = torch.tensor([s.count - 1 for s in scenes])
        one = torch.tensor([s.count == 1 for s in scenes])
        loss = F.cross_entropy(col, y_col) + F.cross_entropy(shp, y_shp) + F.cross_entropy(cnt, y_cnt)
        acc = {"color": (col.argmax(-1) == y_col).float().mean().item(),
               "shape": (shp.argmax(-1) == y_shp).float().mean().item(),
               "count": (cnt.argmax(-1) == y_cnt).float().mean().item()}
        if one.any():
            y_hor = torch.tensor([s.horizontal == "right" for s in scenes], dtype=torch.long)[one]
            y_ver = torch.tensor([s.vertical == "bottom" for s in scenes], dtype=torch.long)[one]
            loss = loss + F.cross_entropy(hor[one], y_hor) + F.cross_entropy(ver[one], y_ver)
            acc["hor"] = (hor[one].argmax(-1) == y_hor).float().mean().item()
            acc["ver"] = (ver[one].argmax(-1) == y_ver).float().mean().item()
        return loss, acc


class DenseHeads(torch.nn.Module):
    """Training-only linear heads (never saved) on every projected image token of every view
    [C, 12, 12, hidden], against the dense targets of demo_labels: object cover (BCE), center-dot
    share (MSE; it sums to the count), the cell's own position in the view (x, y in [-0.5, 0.5]; MSE
    on covered cells, scaled to unit variance: without it, training wipes the position that the
    sin/cos embeddings put into the object tokens, and left/right cannot be read), the scene color on
    covered cells and the scene shape on outline cells (cross-entropy). Every target is local to the
    cell, so that the small tower learns them in a few hundred steps; gathering them into an answer is
    the decoder's part (see attention_targets and AnswerProbes)."""

    OUT = (1, 1, 2, len(demo_data.COLORS), len(demo_data.SHAPES))

    def __init__(self, hidden: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden, sum(self.OUT))
        self.colors = list(demo_data.COLORS)
        r = (torch.arange(12, dtype=torch.float32) + 0.5) / 12 - 0.5
        self.register_buffer("grid", torch.stack(torch.meshgrid(r, r, indexing="xy"), -1), persistent=False)  # [12,12,2] (x, y)

    def forward(self, cells: torch.Tensor, labels: list[torch.Tensor], scenes: list) -> tuple[torch.Tensor, dict]:
        cover, center, pos, col, shp = self.head(cells.float()).split(self.OUT, dim=-1)  # [C, 12, 12, *]
        y = torch.cat(labels)  # [C, 12, 12, 4]: cover, center, edge, valid
        n_views = [lab.shape[0] for lab in labels]
        y_col = torch.cat([torch.full((n,), self.colors.index(s.color)) for n, s in zip(n_views, scenes)])
        y_shp = torch.cat([torch.full((n,), demo_data.SHAPES.index(s.shape)) for n, s in zip(n_views, scenes)])
        cov = y[..., 0]
        l_cov = F.binary_cross_entropy_with_logits(cover[..., 0], cov)
        l_cen = F.mse_loss(center[..., 0], y[..., 1]) * 4
        obj = cov > 0.5
        l_pos = F.mse_loss(pos[obj], self.grid.expand_as(pos)[obj]) * 12 if obj.any() else cov.sum() * 0
        l_col = F.cross_entropy(col[obj], y_col[:, None, None].expand_as(cov)[obj]) if obj.any() else cov.sum() * 0
        w = (y[..., 2] * 8).clamp(max=1.0)  # outline cells
        ce = F.cross_entropy(shp.permute(0, 3, 1, 2), y_shp[:, None, None].expand_as(cov), reduction="none")
        l_shp = (ce * w).sum() / w.sum().clamp(min=1.0)
        with torch.no_grad():
            edge = w > 0.5
            acc = {"d_cov": float(((cover[..., 0] > 0) == (cov > 0.5)).float().mean()),
                   "d_shp": float((shp.argmax(-1) == y_shp[:, None, None])[edge].float().mean()) if edge.any() else 0.0,
                   "d_cnt": float((center[..., 0].sum((1, 2)) - y[..., 1].sum((1, 2))).abs().mean())}
        return l_cov + l_cen + l_pos + l_col + l_shp, acc


class AnswerProbes(torch.nn.Module):
    """Training-only linear probes (never saved) on the answer rows' hidden state after the FIRST decoder
    layer [N, hidden]: the color, shape and count of the first and of the last image, (one-object last
    image) its horizontal and vertical side, and (two-image groups) whether the colors / shapes are the
    same and whether the first has more objects. They ask the first layer to bring each image's facts
    into the answer row in separate, linearly readable places, and to compare them already there
    (deep supervision: the comparison gets a short gradient path instead of only the one through the
    second layer and the 32064-way lm_head)."""

    SPLITS = (len(demo_data.COLORS), len(demo_data.COLORS), len(demo_data.SHAPES), len(demo_data.SHAPES),
              demo_data.MAX_OBJECTS, demo_data.MAX_OBJECTS, 2, 2, 2, 2, 2)

    def __init__(self, hidden: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden, sum(self.SPLITS))
        self.colors = list(demo_data.COLORS)

    def forward(self, h: torch.Tensor, group_of_row: torch.Tensor, groups: list[Group]) -> tuple[torch.Tensor, dict]:
        outs = self.head(h.float()).split(self.SPLITS, dim=-1)
        scenes = [groups[int(b)].scenes for b in group_of_row]  # per row: its group's 1 or 2 scenes
        first, last = [sc[0] for sc in scenes], [sc[-1] for sc in scenes]
        ys = [torch.tensor([self.colors.index(s.color) for s in first]), torch.tensor([self.colors.index(s.color) for s in last]),
              torch.tensor([demo_data.SHAPES.index(s.shape) for s in first]), torch.tensor([demo_data.SHAPES.index(s.shape) for s in last]),
              torch.tensor([s.count - 1 for s in first]), torch.tensor([s.count - 1 for s in last]),
              torch.tensor([s.count == 1 and s.horizontal == "right" for s in last], dtype=torch.long),
              torch.tensor([s.count == 1 and s.vertical == "bottom" for s in last], dtype=torch.long),
              torch.tensor([a.color == b.color for a, b in zip(first, last)], dtype=torch.long),
              torch.tensor([a.shape == b.shape for a, b in zip(first, last)], dtype=torch.long),
              torch.tensor([a.count > b.count for a, b in zip(first, last)], dtype=torch.long)]
        one = torch.tensor([s.count == 1 for s in last])
        pair = torch.tensor([len(sc) == 2 for sc in scenes])
        loss, acc = h.sum() * 0, {}
        for i, (o, y) in enumerate(zip(outs, ys)):
            keep = pair if i >= 8 else one if i >= 6 else torch.ones_like(one)
            if keep.any():
                loss = loss + F.cross_entropy(o[keep], y[keep])
                acc[f"p{i}"] = float((o[keep].argmax(-1) == y[keep]).float().mean())
        return loss, acc


def branch_correct(logits, labels, bidx, n_branches) -> torch.Tensor:
    """[n_branches] bool: every target token of the branch is the argmax (= greedy decoding gives it)."""
    ok = torch.ones(n_branches, dtype=torch.bool)
    wrong = (logits.argmax(-1) != labels) & (bidx >= 0)
    ok[bidx[wrong]] = False
    return ok


def check_packing(model: Phi3VForCausalLM, group: Group) -> float:
    """Max |difference| between a packed branch's logits and the model's own forward on that branch alone."""
    model.eval()
    with torch.no_grad():
        logits, labels, bidx, _ = packed_forward(model, [group])
        worst = 0.0
        for j, br in enumerate(group.branches):
            ids = torch.tensor([group.prefix + br.prompt + br.target])
            pv = torch.zeros(len(group.images), max(c.shape[0] for c in group.images), 3, CROP_SIZE, CROP_SIZE)
            for i, c in enumerate(group.images):
                pv[i, : c.shape[0]] = c.float()
            sizes = torch.tensor([[r * CROP_SIZE, c * CROP_SIZE] for r, c in group.grids])
            ref = model(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits[0]
            t0 = len(group.prefix) + len(br.prompt) - 1
            ref = ref[t0:t0 + len(br.target)]
            worst = max(worst, float((ref - logits[bidx == j]).abs().max()))
    model.train()
    return worst


# ------------------------------------------------------------------------------------- training
class Sampler:
    """Training groups from the pool: one-image groups ask every single-image question that fits
    (color, shape, count, and left/right + top/bottom for one object); two-image groups ask the three
    comparisons (counts always differ; same color and same shape each with probability 1/2)."""

    def __init__(self, pool: list[PoolImage], tok: Tokens, rng: np.random.Generator):
        self.pool, self.tok, self.rng = pool, tok, rng
        self.by_key = defaultdict(list)
        for i, p in enumerate(pool):
            s = p.scene
            self.by_key[(s.count, s.shape, s.color)].append(i)

    def single(self) -> Group:
        p = self.pool[int(self.rng.integers(len(self.pool)))]
        tasks = ["color", "shape", "count"] + (["leftright", "topbottom"] if p.scene.count == 1 else [])
        qas = [(t, *demo_data.single_question(p.scene, t)) for t in tasks]
        return group_for(self.tok, [p], qas)

    def pair(self) -> Group:
        rng = self.rng
        a = self.pool[int(rng.integers(len(self.pool)))]
        s = a.scene
        for _ in range(100):
            count = int(rng.integers(1, demo_data.MAX_OBJECTS + 1))
            if count == s.count:
                continue
            shape = s.shape if rng.random() < 0.5 else demo_data._pick(rng, [x for x in demo_data.SHAPES if x != s.shape])
            color = s.color if rng.random() < 0.5 else demo_data._pick(rng, [x for x in demo_data.COLORS if x != s.color])
            cands = self.by_key.get((count, shape, color))
            if cands:
                b = self.pool[cands[int(rng.integers(len(cands)))]]
                break
        else:
            raise RuntimeError("pool too small to find image pairs")
        if rng.random() < 0.5:
            a, b = b, a
        qas = [(t, *demo_data.pair_question(a.scene, b.scene, t)) for t in demo_data.PAIR_TASKS]
        return group_for(self.tok, [a, b], qas)


def heldout_groups(proc, tok: Tokens, n: int) -> tuple[list[Group], list[dict]]:
    """The first n held-out examples as one-branch groups (fp32 pixels, exactly as inference sees them)."""
    exs = demo_data.dataset("heldout", n)
    groups = []
    for ex in exs:
        out = proc(demo_data.prompt(ex), images=ex["images"])
        imgs = []
        for i, t in enumerate(out.num_img_tokens):
            h, w = (int(v) // CROP_SIZE for v in out.image_sizes[i])
            imgs.append(PoolImage(torch.from_numpy(out.pixel_values[i, : 1 + h * w].copy()), (h, w), t, None))
        groups.append(group_for(tok, imgs, [(ex["task"], ex["question"], ex["answer"])]))
    return groups, exs


def teacher_forced_accuracy(model, groups: list[Group], batch: int = 8) -> tuple[float, dict]:
    """Exact-answer accuracy with teacher forcing (= greedy decoding of the answer: every answer token
    and <|end|> is the argmax)."""
    model.eval()
    per = defaultdict(lambda: [0, 0])
    with torch.no_grad():
        for i in range(0, len(groups), batch):
            logits, labels, bidx, tasks = packed_forward(model, groups[i:i + batch])
            ok = branch_correct(logits, labels, bidx, len(tasks))
            for t, k in zip(tasks, ok.tolist()):
                per[t][0] += k
                per[t][1] += 1
    model.train()
    total = sum(v[0] for v in per.values()) / max(1, sum(v[1] for v in per.values()))
    return total, {t: round(v[0] / v[1], 3) for t, v in sorted(per.items())}


def generate_accuracy(checkpoint: str | Path, n: int, verbose: bool = False) -> dict:
    """Held-out exact-answer accuracy of greedy Phi3VForCausalLM.generate() on the saved checkpoint."""
    from ..runtime.processor import Phi3VProcessor
    from ..runtime.tokenizer import Phi3VTokenizer

    model = Phi3VForCausalLM.from_pretrained(checkpoint)
    proc = Phi3VProcessor.from_pretrained(checkpoint)
    detok = Phi3VTokenizer.from_pretrained(checkpoint)
    per = defaultdict(lambda: [0, 0])
    wrong = []
    for ex in demo_data.dataset("heldout", n):
        out = proc(demo_data.prompt(ex), images=ex["images"])
        new = model.generate(torch.from_numpy(out.input_ids), torch.from_numpy(out.pixel_values),
                             torch.from_numpy(out.image_sizes), max_new_tokens=8)
        text = detok.decode([t for t in new if t not in model.config.stop_ids]).strip()
        ok = text == ex["answer"] and new[-1] == END_ID
        per[ex["task"]][0] += ok
        per[ex["task"]][1] += 1
        if not ok:
            wrong.append((ex["task"], ex["question"], ex["answer"], text))
    correct = sum(v[0] for v in per.values())
    res = {"n": n, "correct": correct, "accuracy": correct / n,
           "per_task": {t: f"{v[0]}/{v[1]}" for t, v in sorted(per.items())}, "wrong": wrong[:20]}
    if verbose:
        print(json.dumps(res, indent=1))
    return res


def write_checkpoint(model: Phi3VForCausalLM, out: Path) -> Path:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_checkpoint(state, out, config=model.config, dtype=torch.bfloat16, side_files_from=ASSETS_DIR)
    pp = json.loads((ASSETS_DIR / "preprocessor_config.json").read_text())
    pp["num_crops"] = demo_data.NUM_CROPS
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/demo/checkpoint")
    ap.add_argument("--minutes", type=float, default=19.5, help="wall-clock cap for pool + training (safety)")
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--pool", type=int, default=2000, help="processed training images")
    ap.add_argument("--singles", type=int, default=4, help="one-image groups per step")
    ap.add_argument("--pairs", type=int, default=2, help="two-image groups per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--aux-frac", type=float, default=0.0,
                    help="fraction of the steps that also train next-token prediction on the question text")
    ap.add_argument("--aux-weight", type=float, default=0.3)
    ap.add_argument("--gpt-init", action="store_true", help="N(0, 0.02) init instead of PyTorch's default")
    ap.add_argument("--scene-weight", type=float, default=0.0,
                    help="weight of the training-only scene-attribute loss on the image features (0: off)")
    ap.add_argument("--scene-decay", type=float, default=0.5,
                    help="fraction of the steps over which that weight decays linearly to --scene-floor of it")
    ap.add_argument("--scene-floor", type=float, default=0.1)
    ap.add_argument("--dense-weight", type=float, default=1.0,
                    help="weight of the training-only dense per-token loss on the image tokens (0: off)")
    ap.add_argument("--attn-weight", type=float, default=2.0,
                    help="weight of the training-only loss on where the first decoder layer's heads look (0: off)")
    ap.add_argument("--probe-weight", type=float, default=1.0,
                    help="weight of the training-only answer-row probes after the first decoder layer (0: off)")
    ap.add_argument("--pca-init", type=int, default=1,
                    help="1: init the patch embedding as the whitened top principal components of pool patches")
    ap.add_argument("--dense-decay", type=float, default=1.0, help="fraction of the steps over which it decays to --dense-floor")
    ap.add_argument("--dense-floor", type=float, default=0.3)
    ap.add_argument("--sincos-pos", type=float, default=0.5,
                    help="init the CLIP position embeddings as a 2D sin/cos table of this amplitude (0: PyTorch default)")
    ap.add_argument("--scene-queries", type=int, default=0, help="attention pooling for the scene heads (0: mean)")
    ap.add_argument("--single-steps", type=int, default=0,
                    help="curriculum: the first N steps use one-image groups only (singles + pairs of them)")
    ap.add_argument("--probe", type=int, default=0,
                    help="probe run: teacher-forced accuracy on this many held-out examples at the end, no checkpoint")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0, help="teacher-forced held-out check every N steps")
    ap.add_argument("--eval-n", type=int, default=300, help="held-out examples for the final generate() check")
    ap.add_argument("--threads", type=int, default=2)
    for k, v in DEMO_SIZES.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    args = ap.parse_args(argv)

    from ..runtime.processor import Phi3VProcessor

    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(demo_data.SPLIT_SEEDS["train"] + args.seed)
    cfg = demo_config(**{k: getattr(args, k) for k in DEMO_SIZES})
    model = Phi3VForCausalLM(cfg)  # PyTorch's default init (seeded): it learned faster than a GPT-style 0.02 init
    if args.gpt_init:
        init_weights(model, args.seed)
    if args.sincos_pos > 0:
        init_vision_positions(model, args.sincos_pos)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.vision_embed_tokens.parameters())
    print(f"model: {n_params / 1e6:.2f}M params ({n_vision / 1e6:.3f}M image side, "
          f"{2 * cfg.vocab_size * cfg.hidden_size / 1e6:.2f}M embedding + lm_head); {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}, vision hidden {cfg.vision.hidden_size} x {cfg.vision.num_hidden_layers} layers",
          flush=True)

    proc = Phi3VProcessor.from_pretrained(ASSETS_DIR, num_crops=demo_data.NUM_CROPS)
    tok = Tokens(proc)
    tok.check()
    pool = build_pool(proc, args.pool, rng)
    grids = defaultdict(int)
    for p in pool:
        grids[p.grid] += 1
    print(f"pool: {len(pool)} images in {time.time() - t_start:.0f}s; crop grids {dict(grids)}", flush=True)
    sampler = Sampler(pool, tok, rng)
    if args.pca_init:
        init_patch_pca(model, pool, seed=args.seed)
    diff = check_packing(model, sampler.pair())
    print(f"packing check: max |logit diff| vs plain forward = {diff:.2e}", flush=True)
    assert diff < 1e-3, diff
    tf_groups = heldout_groups(proc, tok, 120)[0] if args.eval_every else None

    heads = SceneHeads(cfg.hidden_size, args.scene_queries)  # training only, never saved
    dense = DenseHeads(cfg.hidden_size)  # training only, never saved
    probes = AnswerProbes(cfg.hidden_size)  # training only, never saved
    decay, no_decay = [], []
    for name, p in list(model.named_parameters()) + [("aux." + n, p) for n, p in heads.named_parameters()] + \
            [("dense." + n, p) for n, p in dense.named_parameters()] + \
            [("probes." + n, p) for n, p in probes.named_parameters()]:
        (no_decay if p.dim() < 2 or "GN" in name or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    def aux_decay(step):  # 1 -> dense_floor over the first dense_decay of the steps
        t = min(1.0, step / max(1, args.dense_decay * args.steps))
        return 1 - (1 - args.dense_floor) * t

    def dense_weight(step):
        return args.dense_weight * aux_decay(step)

    def scene_weight(step):
        t = min(1.0, step / max(1, args.scene_decay * args.steps))
        return args.scene_weight * (1 - (1 - args.scene_floor) * t)

    model.train()
    t_train = time.time()
    stats = defaultdict(lambda: [0, 0])
    scene_stats = defaultdict(lambda: [0.0, 0])
    loss_avg = None
    step = 0
    for step in range(args.steps):
        if time.time() - t_start > args.minutes * 60:
            print(f"stopping at step {step}: the {args.minutes} minute cap was reached", flush=True)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        if step < args.single_steps:
            batches = [[sampler.single() for _ in range(args.singles + args.pairs)], []]
        else:
            batches = [[sampler.single() for _ in range(args.singles)], [sampler.pair() for _ in range(args.pairs)]]
        aux = step < args.aux_frac * args.steps
        sw = scene_weight(step)
        aw = args.attn_weight * aux_decay(step)
        total_rows = 0
        parts = []
        for groups in batches:
            if not groups:
                continue
            logits, labels, bidx, tasks, means, cells, a_loss, mid = packed_forward(
                model, groups, aux, image_means=True, attn_loss=aw > 0)
            parts.append((logits, labels, bidx, tasks, means, [s for g in groups for s in g.scenes], cells,
                          [lab for g in groups for lab in g.labels], a_loss, mid, groups))
            total_rows += int((bidx >= 0).sum())
        loss_val = 0.0
        dw = dense_weight(step)
        for i, (logits, labels, bidx, tasks, means, scenes, cells, dlabels, a_loss, mid, groups) in enumerate(parts):
            w = torch.where(bidx >= 0, 1.0, args.aux_weight)
            loss = (F.cross_entropy(logits.float(), labels, reduction="none") * w).sum() / total_rows
            if sw > 0:
                s_loss, s_acc = heads(means, scenes)
                loss = loss + sw * s_loss * len(scenes) / sum(len(p[5]) for p in parts)
                for k, v in s_acc.items():
                    scene_stats[k][0] += v
                    scene_stats[k][1] += 1
            if a_loss is not None:
                loss = loss + aw * a_loss * len(scenes) / sum(len(p[5]) for p in parts)
                scene_stats["attn"][0] += a_loss.item()
                scene_stats["attn"][1] += 1
            if dw > 0:
                d_loss, d_acc = dense(cells, dlabels, scenes)
                loss = loss + dw * d_loss * len(scenes) / sum(len(p[5]) for p in parts)
                for k, v in d_acc.items():
                    scene_stats[k][0] += v
                    scene_stats[k][1] += 1
            if args.probe_weight > 0:
                p_loss, p_acc = probes(mid[0], mid[1], groups)
                loss = loss + args.probe_weight * aux_decay(step) * p_loss * len(mid[1]) / total_rows
                for k, v in p_acc.items():
                    scene_stats[k][0] += v
                    scene_stats[k][1] += 1
            loss.backward()
            loss_val += loss.item()
            ok = branch_correct(logits.detach(), labels, bidx, len(tasks))
            for t, k in zip(tasks, ok.tolist()):
                stats[t][0] += k
                stats[t][1] += 1
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()) + list(dense.parameters())
                                       + list(probes.parameters()), 1.0)
        opt.step()
        loss_avg = loss_val if loss_avg is None else 0.9 * loss_avg + 0.1 * loss_val
        if (step + 1) % 10 == 0:
            acc = {t: round(v[0] / v[1], 2) for t, v in sorted(stats.items())}
            print(f"step {step + 1} loss {loss_avg:.3f} lr {lr_at(step):.2e} {time.time() - t_train:.0f}s "
                  f"train-acc {acc}" + (f" scene-probe {({k: round(v[0] / v[1], 2) for k, v in scene_stats.items()})}"
                                        if scene_stats else ""), flush=True)
            stats.clear()
            scene_stats.clear()
        if args.eval_every and (step + 1) % args.eval_every == 0:
            acc, per = teacher_forced_accuracy(model, tf_groups)
            print(f"  held-out (teacher-forced, {len(tf_groups)}): {acc:.3f} {per}", flush=True)
    train_s = time.time() - t_train
    total_s = time.time() - t_start
    print(f"trained {step + 1} steps in {train_s:.0f}s ({total_s:.0f}s with data)", flush=True)
    if args.probe:
        acc, per = teacher_forced_accuracy(model, heldout_groups(proc, tok, args.probe)[0])
        print(f"PROBE held-out (teacher-forced, {args.probe}): {acc:.3f} {per}", flush=True)
        return 0

    out = write_checkpoint(model, Path(args.out))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"checkpoint: {out} ({size / 1e6:.1f} MB)", flush=True)
    t_eval = time.time()
    res = generate_accuracy(out, args.eval_n)
    res.update(steps=step + 1, train_seconds=round(train_s), total_seconds=round(total_s),
               eval_seconds=round(time.time() - t_eval), params=n_params, checkpoint_bytes=size,
               args=vars(args), num_crops=demo_data.NUM_CROPS)
    print(f"held-out exact-answer accuracy (greedy generate, {res['n']} examples): {res['accuracy']:.3f} "
          f"{res['per_task']}", flush=True)
    if res["wrong"]:
        print("wrong:", res["wrong"][:10])
    (out.parent / "eval.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
