"""Config parsing and checkpoint loading: the real config, layouts, dtypes, and every clear error."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from phi3v_edge.models.checkpoint import CheckpointError, CheckpointReader, resolve_checkpoint, save_checkpoint
from phi3v_edge.models.config import ASSETS_DIR, ConfigError, Phi3VConfig
from phi3v_edge.models.modeling import Phi3VForCausalLM
from phi3v_edge.models.testing import random_state_dict, tiny_config, write_tiny_checkpoint

REAL = json.loads((ASSETS_DIR / "config.json").read_text())


def test_real_config():
    cfg = Phi3VConfig.phi35v()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (3072, 32, 32, 96)
    assert cfg.rope_type == "longrope" and len(cfg.rope_short_factor) == len(cfg.rope_long_factor) == 48
    assert cfg.original_max_position_embeddings == 4096
    assert cfg.vision.hidden_size == 1024 and cfg.vision.num_hidden_layers == 24 and cfg.image_dim_out == 1024
    assert cfg.stop_ids == (2, 32000, 32007)
    assert cfg.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert cfg.rope_factors(4096) == cfg.rope_short_factor and cfg.rope_factors(4097) == cfg.rope_long_factor


def test_longrope_and_plain_rope_accepted():
    d = copy.deepcopy(REAL)
    d["rope_scaling"]["type"] = "longrope"
    assert Phi3VConfig.from_dict(d).rope_type == "longrope"
    d["rope_scaling"] = None
    cfg = Phi3VConfig.from_dict(d)
    assert cfg.rope_type is None and cfg.rope_factors(10 ** 6) is None and cfg.rope_attention_factor == 1.0


def _mutate(fn):
    d = copy.deepcopy(REAL)
    fn(d)
    return d


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["embd_layer"].update(hd_transform_order="glb_sub"), "hd_transform_order"),
    (lambda d: d["rope_scaling"].pop("long_factor"), "long_factor is missing"),
    (lambda d: d["rope_scaling"].update(short_factor=[1.0] * 47), "short_factor has 47 values"),
    (lambda d: d["rope_scaling"].update(type="yarn"), "yarn"),
    (lambda d: d.update(model_type="llava"), "model_type"),
    (lambda d: d["img_processor"].update(vision_config={"hidden_size": 64, "num_attention_heads": 2}), "image_dim_out"),
    (lambda d: d["img_processor"].update(vision_config={"hidden_sizee": 64}), "unknown"),
    (lambda d: d["img_processor"].update(name="siglip"), "siglip"),
    (lambda d: d.update(num_attention_heads=128, num_key_value_heads=128), "head_dim 24 .* multiple of 16"),
])
def test_unsupported_config_values_are_clear_errors(mutate, match):
    with pytest.raises(ConfigError, match=match):
        Phi3VConfig.from_dict(_mutate(mutate))


def test_small_vision_config_overrides_clip_defaults():
    cfg = tiny_config(vision_hidden=48, vision_layers=3, vision_heads=3)
    assert (cfg.vision.hidden_size, cfg.vision.num_hidden_layers, cfg.image_dim_out) == (48, 3, 48)
    assert cfg.vision.image_size == 336 and cfg.vision.patch_size == 14
    # round trip through config.json
    assert Phi3VConfig.from_dict(cfg.to_dict()).vision == cfg.vision


def test_sharded_bf16_checkpoint_layout(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tiny_checkpoint / s).is_file() for s in shards)
    r = CheckpointReader(tiny_checkpoint)
    assert r.get("model.norm.weight").dtype == torch.bfloat16
    assert (tiny_checkpoint / "tokenizer.json").is_file() and (tiny_checkpoint / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_file_checkpoint_in_each_dtype_loads(tmp_path, dtype):
    cfg = tiny_config(num_layers=1, vision_layers=1)
    state = random_state_dict(cfg, seed=1)
    save_checkpoint(state, tmp_path, config=cfg, dtype=dtype, max_shard_bytes=1 << 40)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    m = Phi3VForCausalLM.from_pretrained(tmp_path)
    w = m.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, state["model.layers.0.mlp.down_proj.weight"].to(dtype).float())


def test_missing_tensor_is_named(tmp_path):
    cfg = tiny_config(num_layers=1, vision_layers=1)
    state = random_state_dict(cfg)
    del state["model.layers.0.self_attn.o_proj.weight"]
    save_checkpoint(state, tmp_path, config=cfg)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight"):
        Phi3VForCausalLM.from_pretrained(tmp_path)


def test_misshaped_tensor_names_key_and_both_shapes(tmp_path):
    cfg = tiny_config(num_layers=1, vision_layers=1)
    state = random_state_dict(cfg)
    state["model.vision_embed_tokens.glb_GN"] = torch.zeros(1, 1, 100)
    save_checkpoint(state, tmp_path, config=cfg)
    with pytest.raises(CheckpointError, match=r"glb_GN has shape \(1, 1, 100\).*expects \(1, 1, 128\)"):
        Phi3VForCausalLM.from_pretrained(tmp_path)


def test_missing_shard_and_missing_weights(tmp_path):
    p = write_tiny_checkpoint(tmp_path / "c", tiny_config(num_layers=1, vision_layers=1), max_shard_bytes=1 << 20)
    next(p.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard .* is missing"):
        CheckpointReader(p)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(REAL))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        CheckpointReader(tmp_path / "empty")


def test_repo_id_offline_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(CheckpointError, match="offline.*local"):
        resolve_checkpoint("microsoft/Phi-3.5-vision-instruct")


def test_not_a_directory_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing directory"):
        resolve_checkpoint(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_checkpoint(tmp_path / "d")
