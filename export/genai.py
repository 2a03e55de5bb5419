"""Checkpoint -> onnxruntime-genai package (`phi3v-edge export CKPT --format genai --out DIR`).

The package is one directory that onnxruntime-genai's `Model(DIR)` (C: OgaCreateModel) loads as model type "phi3v":

    genai_config.json      model.type "phi3v"; decoder / embedding / vision sections (file, input and output
                           names, sizes); search (max_length, past_present_share_buffer, greedy defaults)
    processor_config.json  onnxruntime-extensions image ops: DecodeImage -> ConvertRGB -> Phi3ImageTransform
                           (num_crops from the checkpoint's preprocessor_config.json, num_img_tokens 144)
    vision.onnx(.data), embedding.onnx(.data), text.onnx(.data)   see export/genai_graphs.py
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, preprocessor_config.json, ...
    export_info.json       what phi3v-edge wrote (options, source); onnxruntime-genai ignores it

Same options and the same streaming, low-memory build as the bundle export (export/bundle.py): one tensor
read at a time, initializers appended to each graph's .data file as they are made. Written into a locked
.NAME.partial-* directory renamed into place at the end (export/bundle.py's, stale ones removed the same way).
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from pathlib import Path

from phi3v_edge.models.checkpoint import CheckpointReader, resolve_checkpoint
from phi3v_edge.models.config import Phi3VConfig

from . import genai_graphs as gg
from .bundle import (
    _check_keys,
    _copy_side_files,
    fit_block_size,
    resolve_options,
    staged_output,
)
from .decoder_graph import resolve_options as decoder_options
from .options import ExportError
from .vision_graph import int8_block_size

CONFIG_FILE = "genai_config.json"
PROCESSOR_FILE = "processor_config.json"
INFO_FILE = "export_info.json"
MODEL_TYPE = "phi3v"
DEFAULT_MAX_LENGTH = 4096  # search.max_length: the KV buffers onnxruntime-genai allocates (hosts may raise it)


def export_genai(checkpoint: str | Path, out_dir: str | Path, precision: str = "int4", *, target: str = "auto",
                 vision_precision: str | None = None, block_size: int | None = None,
                 accuracy_level: int | None = None, vision_accuracy_level: int | None = None,
                 symmetric: bool = True, lm_head_precision: str | None = None,
                 embedding_precision: str | None = None, max_length: int | None = None, force: bool = False,
                 all_logits: bool = False, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Export `checkpoint` to an onnxruntime-genai package at `out_dir`; returns its path. The options are
    export_bundle's (precision, target, vision_precision, block_size, accuracy_level, vision_accuracy_level,
    symmetric, lm_head and embedding precision; the same checks and defaults); max_length is genai_config's search.max_length (default
    4096, or max_position_embeddings when smaller; the rotary tables cover the model's whole context). The
    vision graph's pixel_values and image_features use the text graph's activation dtype (onnxruntime-genai
    hands the vision output buffer to the embedding)."""
    if all_logits:
        raise ExportError("--all-logits is for bundles: the genai text graph returns the last position's logits "
                          "(onnxruntime-genai keeps only those)")
    asked = block_size
    target, vision_precision, accuracy_level, vision_accuracy_level, io_dtype, block_size = resolve_options(
        precision, target, vision_precision, block_size, accuracy_level, vision_accuracy_level)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force (force=True) to replace it")

    src = resolve_checkpoint(checkpoint)
    cfg = Phi3VConfig.from_json(src)
    block_size = fit_block_size(cfg, block_size, asked)
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, cfg.max_position_embeddings)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= cfg.max_position_embeddings:
        raise ExportError(f"max_length {max_length!r} must be an integer in 2..{cfg.max_position_embeddings} "
                          "(max_position_embeddings)")
    reader = CheckpointReader(src)
    _check_keys(reader, cfg)
    o = decoder_options(cfg, precision, io_dtype, block_size, symmetric, lm_head_precision, embedding_precision,
                        False, accuracy_level)
    stage = (lambda name: (lambda i, n: progress(name, i, n))) if progress else (lambda name: None)

    with staged_output(out) as tmp:
        vision = gg.build_genai_vision(
            reader, cfg, tmp, precision=vision_precision, io_dtype=io_dtype,
            block_size=int8_block_size(cfg, block_size) if vision_precision == "int8" else block_size,
            accuracy_level=vision_accuracy_level, progress=stage("vision"))
        embedding = gg.build_genai_embedding(reader, cfg, tmp, o)
        text = gg.build_genai_text(reader, cfg, tmp, o, cfg.max_position_embeddings, progress=stage("decoder"))
        side = _copy_side_files(src, tmp)
        num_crops = int(json.loads((tmp / "preprocessor_config.json").read_text()).get("num_crops", 4))
        (tmp / PROCESSOR_FILE).write_text(json.dumps(processor_config(num_crops, cfg.num_img_tokens), indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(genai_config(cfg, target, max_length), indent=2) + "\n")
        info = {"format": "onnxruntime-genai", "model_type": MODEL_TYPE, "producer": "phi3v-edge",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"checkpoint": str(checkpoint), "resolved_path": str(src)}, "target": target,
                "num_crops": num_crops, "vision": vision, "embedding": embedding, "text": text, "files": side}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def processor_config(num_crops: int, num_img_tokens: int) -> dict:
    """onnxruntime-extensions' image pipeline for Phi-3-vision (the layout of onnxruntime-genai's
    test/models/phi3-v/processor_config.json)."""
    ext = "com.microsoft.extensions"
    return {"processor": {"name": "image_processing", "transforms": [
        {"operation": {"name": "decode_image", "domain": ext, "type": "DecodeImage", "attrs": {"color_space": "BGR"}}},
        {"operation": {"name": "convert_to_rgb", "domain": ext, "type": "ConvertRGB"}},
        {"operation": {"name": "phi3_image_transform", "domain": ext, "type": "Phi3ImageTransform",
                       "attrs": {"num_crops": num_crops, "num_img_tokens": num_img_tokens}}},
    ]}}


def genai_config(cfg: Phi3VConfig, target: str, max_length: int) -> dict:
    """genai_config.json (fields as onnxruntime-genai's src/config.cpp reads them)."""
    session = {"log_id": "onnxruntime-genai", "provider_options": [{"cuda": {}}] if target == "cuda" else []}
    return {
        "model": {
            "type": MODEL_TYPE,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": sorted(set(cfg.stop_ids)),
            "pad_token_id": cfg.pad_token_id,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": session,
                "filename": gg.TEXT_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
                "inputs": {"inputs_embeds": gg.INPUTS_EMBEDS, "attention_mask": gg.ATTENTION_MASK,
                           "past_key_names": gg.PAST_KEY, "past_value_names": gg.PAST_VALUE},
                "outputs": {"logits": gg.LOGITS, "present_key_names": gg.PRESENT_KEY,
                            "present_value_names": gg.PRESENT_VALUE},
            },
            "embedding": {
                "filename": gg.EMBEDDING_FILE,
                "inputs": {"input_ids": gg.INPUT_IDS, "image_features": gg.IMAGE_FEATURES},
                "outputs": {"inputs_embeds": gg.INPUTS_EMBEDS},
            },
            "vision": {
                "filename": gg.VISION_FILE,
                "config_filename": PROCESSOR_FILE,
                "inputs": {"pixel_values": gg.PIXEL_VALUES, "image_sizes": gg.IMAGE_SIZES},
                "outputs": {"image_features": gg.IMAGE_FEATURES},
            },
        },
        "search": {
            "max_length": max_length, "min_length": 0, "past_present_share_buffer": True,
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
            "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0, "early_stopping": True,
        },
    }
