"""The PyTorch reference: full-size structure, forward with images, LongRoPE rule, sampling,
and transformers' Phi3 as an independent oracle for the decoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from phi3v_edge.models.config import Phi3VConfig
from phi3v_edge.models.modeling import Phi3VForCausalLM
from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint
from phi3v_edge.runtime.image_layout import layout_index


def test_full_size_meta_model_has_the_real_tensors():
    cfg = Phi3VConfig.phi35v()
    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    params = dict(model.named_parameters())
    assert len(params) == 592
    assert len(model.state_dict()) == 592  # no extra buffers
    assert sum(p.numel() for p in params.values()) == 4_146_621_440
    expect = {
        "model.embed_tokens.weight": (32064, 3072),
        "model.layers.0.self_attn.qkv_proj.weight": (9216, 3072),
        "model.layers.31.self_attn.o_proj.weight": (3072, 3072),
        "model.layers.5.mlp.gate_up_proj.weight": (16384, 3072),
        "model.layers.5.mlp.down_proj.weight": (3072, 8192),
        "model.layers.5.input_layernorm.weight": (3072,),
        "model.layers.5.post_attention_layernorm.weight": (3072,),
        "model.norm.weight": (3072,),
        "lm_head.weight": (32064, 3072),
        "model.vision_embed_tokens.img_processor.vision_model.pre_layrnorm.weight": (1024,),
        "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight": (1024,),
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.position_embedding.weight": (577, 1024),
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.23.mlp.fc2.bias": (1024,),
        "model.vision_embed_tokens.img_projection.0.weight": (3072, 4096),
        "model.vision_embed_tokens.img_projection.0.bias": (3072,),
        "model.vision_embed_tokens.img_projection.2.weight": (3072, 3072),
        "model.vision_embed_tokens.glb_GN": (1, 1, 4096),
        "model.vision_embed_tokens.sub_GN": (1, 1, 1, 4096),
    }
    for name, shape in expect.items():
        assert tuple(params[name].shape) == shape, name


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Phi3VForCausalLM.from_pretrained(tiny_checkpoint)


def _image_inputs(rng, grids, num_crops=4):
    n = len(grids)
    pv = torch.from_numpy(rng.standard_normal((n, num_crops + 1, 3, 336, 336)).astype(np.float32))
    sizes = torch.tensor([[r * 336, c * 336] for r, c in grids])
    return pv, sizes


def _prompt_ids(counts):
    """[BOS text] (image k run) [BOS text] ... as the processor lays them out."""
    ids = [1, 450, 4996]
    for k, n in enumerate(counts, start=1):
        ids += [-k] * n + [1, 29871, 13, 3750]
    return torch.tensor([ids])


def test_layout_matches_the_index_based_layout(model):
    """Two independent implementations of the HD layout: tensor reshapes (reference) and index arithmetic (runtime)."""
    emb = model.model.vision_embed_tokens
    for rows, cols in [(1, 1), (2, 3), (3, 1)]:
        c = 1 + rows * cols
        merged = torch.randn(c, 12, 12, emb.cfg.merged_dim)
        got = emb.layout(merged, rows, cols)
        table = torch.cat([merged.reshape(c * 144, -1), emb.sub_GN.reshape(1, -1), emb.glb_GN.reshape(1, -1)])
        want = table[torch.from_numpy(layout_index([(rows, cols)]))]
        assert torch.equal(got, want)


@pytest.mark.parametrize("grids", [[(1, 2)], [(2, 1), (1, 1)]])
def test_forward_with_images(model, grids):
    rng = np.random.default_rng(0)
    pv, sizes = _image_inputs(rng, grids)
    counts = [(r * c + 1) * 144 + 1 + (r + 1) * 12 for r, c in grids]
    ids = _prompt_ids(counts)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits
        text_only = model(input_ids=ids.clamp_min(0)).logits
    assert out.shape == (1, ids.shape[1], 32064)
    assert torch.isfinite(out).all()
    # the image features really are written at the placeholder positions
    assert (out[0, -1] - text_only[0, -1]).abs().max() > 1e-3
    # ...and only there: positions before the first image are unchanged
    torch.testing.assert_close(out[0, :3], text_only[0, :3])
    # a wrong placeholder count is a clear error
    short = torch.cat([ids[:, :5], ids[:, 6:]], dim=1)  # one image-1 placeholder token fewer
    with pytest.raises(ValueError, match="image 1 has .* feature tokens but .* placeholder positions"):
        model(input_ids=short, pixel_values=pv, image_sizes=sizes)


def test_image_features_ignore_padding_crops(model):
    """Only the 1 + rows*cols valid crops matter: garbage in the padding crops changes nothing."""
    rng = np.random.default_rng(1)
    pv, sizes = _image_inputs(rng, [(1, 1)], num_crops=6)
    pv2 = pv.clone()
    pv2[0, 2:] = 1e3
    emb = model.model.vision_embed_tokens
    with torch.no_grad():
        torch.testing.assert_close(emb(pv, sizes)[0], emb(pv2, sizes)[0])


@pytest.fixture(scope="module")
def boundary_model(tmp_path_factory):
    cfg = tiny_config(original_max_position_embeddings=24)
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("boundary"), cfg, seed=3)
    return Phi3VForCausalLM.from_pretrained(path)


def test_cached_equals_uncached_across_the_longrope_boundary(boundary_model):
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]])  # 13 tokens
    cached = boundary_model.generate(ids, max_new_tokens=30, stop_ids=())
    uncached = boundary_model.generate(ids, max_new_tokens=30, stop_ids=(), use_cache=False)
    assert len(cached) == 30  # crosses 24 at step 12
    assert cached == uncached


def test_longrope_factor_choice_changes_logits(boundary_model):
    """Keys rotated with short factors give different logits than the long recompute: the recompute matters."""
    cfg = boundary_model.config
    ids = torch.randint(3, 30000, (1, 30), generator=torch.Generator().manual_seed(0))
    emb = boundary_model.model.embed_tokens(ids)
    pos = torch.arange(30)[None]
    with torch.no_grad():
        long_logits = boundary_model.decode(emb, pos, None)  # total 30 > 24: long factors
        short_logits = boundary_model.decode(emb, pos, None, total_length=cfg.original_max_position_embeddings)
    assert (long_logits - short_logits).abs().max() > 1e-3


def test_prompt_longer_than_the_boundary_uses_long_factors_from_the_start(boundary_model):
    ids = torch.randint(3, 30000, (1, 30), generator=torch.Generator().manual_seed(1))
    assert boundary_model.generate(ids, max_new_tokens=5, stop_ids=()) == \
        boundary_model.generate(ids, max_new_tokens=5, stop_ids=(), use_cache=False)


def test_sampling_seeded_and_greedy_limits(model):
    ids = torch.tensor([[1, 450, 4996, 17354]])
    a = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7, stop_ids=())
    b = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7, stop_ids=())
    c = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=8, stop_ids=())
    assert a == b and a != c
    greedy = model.generate(ids, max_new_tokens=12, stop_ids=())
    assert model.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, seed=3, stop_ids=()) == greedy


def test_generation_stops_at_a_stop_id(model):
    ids = torch.tensor([[1, 450, 4996, 17354]])
    greedy = model.generate(ids, max_new_tokens=8, stop_ids=())
    stopped = model.generate(ids, max_new_tokens=8, stop_ids=(greedy[3],))
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]


def test_decoder_matches_transformers_phi3(tiny_checkpoint, model):
    """Independent oracle: transformers' Phi3ForCausalLM with LongRoPE on the same decoder weights,
    on both sides of the boundary (uncached forward of 20 and of 40 tokens with orig = 32)."""
    import transformers

    cfg = tiny_config(original_max_position_embeddings=32, max_position_embeddings=4096)
    hf_cfg = transformers.Phi3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=cfg.original_max_position_embeddings, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": cfg.rope_short_factor, "long_factor": cfg.rope_long_factor},
        tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Phi3ForCausalLM(hf_cfg).eval()
    ours = Phi3VForCausalLM(cfg).eval()
    sd = {k: v for k, v in model.state_dict().items()}
    ours.load_state_dict(sd)
    missing, unexpected = hf.load_state_dict({k: v for k, v in sd.items() if "vision_embed_tokens" not in k}, strict=False)
    assert not [m for m in missing if "rotary" not in m] and not unexpected
    for n in (20, 40):
        ids = torch.randint(3, 30000, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = hf(input_ids=ids).logits
            got = ours(input_ids=ids).logits
        rel = (got - want).norm() / want.norm()
        assert rel < 1e-5, (n, float(rel))
