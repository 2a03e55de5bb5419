"""Phi3VConfig: the parsed `config.json` of a Phi-3.5-vision checkpoint (model_type `phi3_v`).

Plain dataclasses, no torch and no transformers, so the export stage and the tests can read a
config without building a model. Unsupported values fail here, with a message that names them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from phi3v_edge.runtime.model_facts import (  # noqa: F401  (the model facts' one home; re-exported for models/)
    CROP_SIZE,
    STOP_IDS,
    crosses_to_long,
    rope_attention_factor,
    uses_long_factors,
)
from phi3v_edge.runtime.model_facts import TOKENS_PER_CROP as NUM_IMG_TOKENS_PER_CROP  # 144: (336 / 14 / 2) ** 2

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "phi35v"  # the real config + tokenizer files


class ConfigError(ValueError):
    """A config.json value this project does not support (or that is inconsistent)."""


@dataclass
class VisionConfig:
    """The CLIP vision tower (HF CLIPVisionConfig field names); the defaults are CLIP ViT-L/14-336, the tower
    implied by `img_processor.model_name` (its config is not in config.json)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches_per_side(self) -> int:  # 24 for 336/14
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


CLIP_VIT_L_14_336 = asdict(VisionConfig())


@dataclass
class Phi3VConfig:
    # decoder (Phi-3-mini)
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    rope_type: str | None = "longrope"  # "longrope" (config says "su" or "longrope") or None (plain RoPE)
    rope_short_factor: list[float] | None = None  # [head_dim / 2]
    rope_long_factor: list[float] | None = None  # [head_dim / 2]
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 32000
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    # vision side
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_dim_out: int = 1024  # CLIP hidden size; the 2x2 merge gives 4 * image_dim_out
    num_img_tokens: int = NUM_IMG_TOKENS_PER_CROP
    layer_idx: int = -2  # CLIP hidden_states[-2]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json as read

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:  # 96
        return self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def merged_dim(self) -> int:  # 4096: 2x2 merged CLIP features
        return 4 * self.image_dim_out

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return STOP_IDS

    @property
    def rope_attention_factor(self) -> float:
        """cos and sin are both scaled by this (LongRoPE); 1.0 when no context extension."""
        if self.rope_type is None:
            return 1.0
        return rope_attention_factor(self.max_position_embeddings, self.original_max_position_embeddings)

    def rope_factors(self, total_length: int) -> list[float] | None:
        """LongRoPE rescale factors for a sequence whose total length is `total_length`:
        short while total_length <= original_max_position_embeddings, long beyond."""
        if self.rope_type is None:
            return None
        if uses_long_factors(total_length, self.original_max_position_embeddings):
            return self.rope_long_factor
        return self.rope_short_factor

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Phi3VConfig":
        mt = d.get("model_type")
        if mt is not None and mt != "phi3_v":
            raise ConfigError(f"model_type is {mt!r}; phi3v-edge supports 'phi3_v' (Phi-3.5-vision) only")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in d and f.name not in ("vision", "raw", "rope_type"):
                kw[f.name] = d[f.name]
        if kw.get("tie_word_embeddings"):
            raise ConfigError("tie_word_embeddings=true is not supported (Phi-3.5-vision has an untied lm_head)")
        cfg = cls(**kw, raw=dict(d))
        cfg.torch_dtype = str(d.get("torch_dtype") or d.get("dtype") or "bfloat16")
        if cfg.num_key_value_heads is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}")
        if cfg.head_dim % 16:
            raise ConfigError(f"head_dim {cfg.head_dim} (hidden_size {cfg.hidden_size} / {cfg.num_attention_heads} heads) "
                              "must be a multiple of 16: ONNX Runtime's GroupQueryAttention kernels require it, so "
                              "such a model could not be exported (Phi-3.5-vision has 96)")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {cfg.num_attention_heads} is not a multiple of num_key_value_heads {cfg.num_key_value_heads}")
        cfg._parse_rope(d.get("rope_scaling"))
        cfg._parse_vision(d)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "Phi3VConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def phi35v(cls) -> "Phi3VConfig":
        """The real Phi-3.5-vision-instruct config (shipped in models/assets/phi35v)."""
        return cls.from_json(ASSETS_DIR / "config.json")

    def to_dict(self) -> dict[str, Any]:
        """config.json content (the original layout, with our edits applied)."""
        d = dict(self.raw) if self.raw else {"model_type": "phi3_v", "architectures": ["Phi3VForCausalLM"]}
        for f in fields(self):
            if f.name in ("vision", "raw", "rope_type", "rope_short_factor", "rope_long_factor", "image_dim_out",
                          "num_img_tokens", "layer_idx"):
                continue
            d[f.name] = getattr(self, f.name)
        d["model_type"] = "phi3_v"
        if self.rope_type is None:
            d["rope_scaling"] = None
        else:
            d["rope_scaling"] = {"type": (self.raw.get("rope_scaling") or {}).get("type", "su"),
                                 "short_factor": list(self.rope_short_factor), "long_factor": list(self.rope_long_factor)}
        ip = dict(d.get("img_processor") or {})
        ip.update({"image_dim_out": self.image_dim_out, "num_img_tokens": self.num_img_tokens,
                   "name": "clip_vision_model", "model_name": ip.get("model_name", "openai/clip-vit-large-patch14-336")})
        if any(getattr(self.vision, k) != v for k, v in CLIP_VIT_L_14_336.items()):
            ip["vision_config"] = {f.name: getattr(self.vision, f.name) for f in fields(VisionConfig)}
        d["img_processor"] = ip
        d.setdefault("embd_layer", {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                                    "use_hd_transform": True, "with_learnable_separator": True})
        return d

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ---- validation helpers ---------------------------------------------------------------------
    def _parse_rope(self, rs: dict[str, Any] | None) -> None:
        if rs is None:
            self.rope_type = None
            return
        rtype = rs.get("type", rs.get("rope_type"))
        if rtype not in ("su", "longrope"):
            raise ConfigError(f"rope_scaling type {rtype!r} is not supported (use 'su'/'longrope', or null for plain RoPE)")
        self.rope_type = "longrope"
        half = self.head_dim // 2
        for name in ("short_factor", "long_factor"):
            vals = rs.get(name)
            if vals is None:
                raise ConfigError(f"rope_scaling.{name} is missing (LongRoPE needs both short_factor and long_factor)")
            if len(vals) != half:
                raise ConfigError(f"rope_scaling.{name} has {len(vals)} values; head_dim {self.head_dim} needs {half}")
            setattr(self, f"rope_{name}", [float(v) for v in vals])
        if self.original_max_position_embeddings is None:
            raise ConfigError("rope_scaling is set but original_max_position_embeddings is missing")

    def _parse_vision(self, d: dict[str, Any]) -> None:
        ip = d.get("img_processor") or {}
        name = ip.get("name", "clip_vision_model")
        if name != "clip_vision_model":
            raise ConfigError(f"img_processor.name {name!r} is not supported (only 'clip_vision_model')")
        vc = dict(CLIP_VIT_L_14_336)
        override = ip.get("vision_config") or {}
        unknown = set(override) - {f.name for f in fields(VisionConfig)} - {"model_type", "projection_dim", "dropout",
                                                                            "attention_dropout", "initializer_range",
                                                                            "initializer_factor"}
        if unknown:
            raise ConfigError(f"img_processor.vision_config has unknown CLIPVisionConfig fields: {sorted(unknown)}")
        vc.update({k: v for k, v in override.items() if k in vc})
        self.vision = VisionConfig(**vc)
        if self.vision.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"vision hidden_act {self.vision.hidden_act!r} is not supported (quick_gelu or gelu)")
        if self.vision.hidden_size % self.vision.num_attention_heads:
            raise ConfigError("vision hidden_size is not divisible by its num_attention_heads")
        self.image_dim_out = int(ip.get("image_dim_out", self.vision.hidden_size))
        if self.image_dim_out != self.vision.hidden_size:
            raise ConfigError(f"img_processor.image_dim_out ({self.image_dim_out}) must equal the CLIP hidden size "
                              f"({self.vision.hidden_size})")
        self.num_img_tokens = int(ip.get("num_img_tokens", NUM_IMG_TOKENS_PER_CROP))
        side = self.vision.num_patches_per_side
        if self.vision.image_size != CROP_SIZE or side % 2:
            raise ConfigError(f"vision image_size must be {CROP_SIZE} with an even patch grid (got image_size "
                              f"{self.vision.image_size}, patch_size {self.vision.patch_size})")
        if self.num_img_tokens != (side // 2) ** 2:
            raise ConfigError(f"img_processor.num_img_tokens {self.num_img_tokens} != ({side}/2)^2")
        layer_idx = int(ip.get("layer_idx", -2))
        if layer_idx != -2:
            raise ConfigError(f"img_processor.layer_idx {layer_idx} is not supported (Phi-3.5-vision uses -2)")
        if ip.get("type_feature", "patch") != "patch":
            raise ConfigError("img_processor.type_feature must be 'patch' (CLS token dropped)")
        el = d.get("embd_layer") or {}
        checks = {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                  "use_hd_transform": True, "with_learnable_separator": True}
        for k, want in checks.items():
            if k in el and el[k] != want:
                raise ConfigError(f"embd_layer.{k} = {el[k]!r} is not supported (only {want!r})")
