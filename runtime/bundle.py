"""The bundle format: what export writes and the runtime (or a C++ host) loads. Torch-free.

A bundle is a directory:
    manifest.json                      this format's description (see `Manifest` below)
    decoder.onnx (+ decoder.onnx.data) token/image embeddings -> 32 layers -> logits, KV in shared buffers
    vision.onnx  (+ vision.onnx.data)  valid crops -> image features laid out for the decoder
    tokenizer.json, tokenizer_config.json, preprocessor_config.json, generation_config.json, ...

decoder.onnx I/O (format version 2; B = rows, S = new tokens per row this call, M = max_length of the KV buffers):
    input_ids               int64  [B, S]       token ids; image placeholder positions hold negative ids
    image_features          io     [T, hidden]  rows written, in order, at the positions where input_ids < 0
                                                (T = count of negative ids; B = 1 when T > 0; T = 0 on decode steps)
    position_ids            int64  [B, S]       row of cos_cache/sin_cache for each new token: the position p
                                                under the short LongRoPE factors, M + p under the long ones
    past_key_values.{i}.key / .value  io [B, kv_heads, M, head_dim]  same buffer as present.{i}.* (bind both)
    seqlens_k               int32  [B]          per row: total length after this call - 1
    total_sequence_length   int32  []           the largest total length after this call over the rows (<= M)
    cos_cache, sin_cache    io     [2 M, head_dim/2]  LongRoPE tables, short factors (rows 0..M-1) then long
                                                (rows M..2M-1), scaled: see runtime/rope.py
  ->
    logits                  io     [B, 1, vocab] (last position; [B, S, vocab] if manifest decoder.all_logits)
    present.{i}.key / .value          io [B, kv_heads, M, head_dim]
    Rows are independent: a batched decode step (S = 1) gives each row the logits it would get alone.

vision.onnx I/O:
    pixel_values            io     [C, 3, 336, 336]  the valid crops of all images (per image: global view first,
                                                      then its rows*cols tiles row-major), images in prompt order
    layout_index            int64  [T]          rows of the per-token table below, in decoder order
  ->
    image_features          io     [T, hidden]  table = [projected merged crop tokens (C*144 rows, crop-major),
                                                projected sub_GN, projected glb_GN]; image_features = table[layout_index]
                                                (see runtime/image_layout.py for how layout_index is built)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT_NAME = "phi3v-edge-bundle"
FORMAT_VERSION = 2  # 2: batch dimension, position_ids, stacked [short; long] rope tables
MANIFEST = "manifest.json"
DECODER_FILE = "decoder.onnx"
VISION_FILE = "vision.onnx"

# decoder.onnx names
INPUT_IDS = "input_ids"
IMAGE_FEATURES = "image_features"
POSITION_IDS = "position_ids"
SEQLENS_K = "seqlens_k"
TOTAL_SEQ_LEN = "total_sequence_length"
COS_CACHE = "cos_cache"
SIN_CACHE = "sin_cache"
LOGITS = "logits"
BATCH_DIM = "batch"
# vision.onnx names
PIXEL_VALUES = "pixel_values"
LAYOUT_INDEX = "layout_index"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


class BundleError(ValueError):
    """A bundle that is missing, corrupt, or from a format version this runtime does not know."""


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def load_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read manifest.json and run the cheap checks done at every load: format name and version, every
    listed file present with its recorded size. (`verify_bundle` adds the sha256 of every file.)"""
    d = Path(bundle_dir)
    if not d.is_dir():
        raise BundleError(f"bundle directory {d} does not exist")
    mp = d / MANIFEST
    if not mp.is_file():
        raise BundleError(f"{d} has no {MANIFEST}: not a phi3v-edge bundle (create one with `phi3v-edge export`)")
    try:
        m = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mp} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise BundleError(f"{mp} is not a {FORMAT_NAME} manifest")
    ver = m.get("format_version")
    if ver != FORMAT_VERSION:
        raise BundleError(f"bundle {d} has format version {ver}; this phi3v-edge reads version {FORMAT_VERSION} "
                          "(re-export it with this version's `phi3v-edge export`)")
    for name, info in m.get("files", {}).items():
        p = d / name
        if not p.is_file():
            raise BundleError(f"bundle {d} is missing {name}")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise BundleError(f"bundle file {name} has {size} bytes, the manifest says {info['bytes']} (truncated or replaced)")
    for key in ("decoder", "rope", "tokens"):
        if key not in m:
            raise BundleError(f"{mp} lacks the '{key}' section")
    return m


def verify_bundle(bundle_dir: str | Path, progress=None) -> list[str]:
    """Check the sha256 of every file listed in the manifest. Returns the list of problems (empty if fine)."""
    d = Path(bundle_dir)
    m = load_manifest(d)
    problems = []
    for name, info in m["files"].items():
        if progress:
            progress(name)
        digest = file_sha256(d / name)
        if digest != info["sha256"]:
            problems.append(f"{name}: sha256 {digest[:16]}... differs from the manifest's {info['sha256'][:16]}...")
    return problems


def describe_files(bundle_dir: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The manifest's `files` section for these files: size and sha256."""
    d = Path(bundle_dir)
    return {n: {"bytes": (d / n).stat().st_size, "sha256": file_sha256(d / n)} for n in sorted(names)}
