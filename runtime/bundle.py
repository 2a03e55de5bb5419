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
    """Read manifest.json and run the cheap checks done at every load: format name and version, the schema of
    every field the runtime reads (`check_manifest`), every listed file present with its recorded size.
    (`verify_bundle` adds the sha256 of every file.) Any problem is a BundleError naming the field and the file."""
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
    if "format_version" not in m:
        raise BundleError(f"{mp}: field 'format_version' is missing (this phi3v-edge reads version {FORMAT_VERSION})")
    if isinstance(ver, bool) or not isinstance(ver, int):
        raise BundleError(f"{mp}: field 'format_version' must be an integer, got {type(ver).__name__} {ver!r} "
                          f"(this phi3v-edge reads version {FORMAT_VERSION}; a hand-edited manifest? re-export it)")
    if ver != FORMAT_VERSION:
        raise BundleError(f"bundle {d} has format version {ver}; this phi3v-edge reads version {FORMAT_VERSION} "
                          "(re-export it with this version's `phi3v-edge export`)")
    check_manifest(m, mp)
    for name, info in m["files"].items():
        p = d / name
        if not p.is_file():
            raise BundleError(f"bundle {d} is missing {name}")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise BundleError(f"bundle file {name} has {size} bytes, the manifest says {info['bytes']} (truncated or replaced)")
    return m


# ---- manifest schema: the fields the runtime reads, with their types -------------------------------------
_KINDS = {"int": "an integer", "number": "a number", "str": "a string", "dict": "an object", "list": "a list",
          "bool": "true or false"}


def _is(v, kind: str) -> bool:
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, {"str": str, "dict": dict, "list": list, "bool": bool}[kind])


def _field(section: dict, key: str, kind: str, where: str, mp, *, required: bool = True, nullable: bool = False):
    """section[key], checked: BundleError naming `where.key` and the manifest file when missing or mistyped."""
    name = f"{where}.{key}" if where else key
    if key not in section:
        if required:
            raise BundleError(f"{mp}: field '{name}' is missing (a damaged or hand-edited manifest? re-export the bundle)")
        return None
    v = section[key]
    if v is None and nullable:
        return None
    if not _is(v, kind):
        raise BundleError(f"{mp}: field '{name}' must be {_KINDS[kind]}{' or null' if nullable else ''}, "
                          f"got {type(v).__name__} {v!r:.60}")
    return v


def check_manifest(m: dict[str, Any], mp: str | Path = MANIFEST) -> None:
    """The manifest's schema (the fields the runtime reads): BundleError naming the first bad field and the file."""
    files = _field(m, "files", "dict", "", mp)
    for name, info in files.items():
        where = f"files.{name}"
        if not isinstance(info, dict):
            raise BundleError(f"{mp}: field '{where}' must be an object with 'bytes' and 'sha256', got {info!r:.60}")
        if _field(info, "bytes", "int", where, mp) < 0:
            raise BundleError(f"{mp}: field '{where}.bytes' must be >= 0, got {info['bytes']}")
        digest = _field(info, "sha256", "str", where, mp)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"{mp}: field '{where}.sha256' must be 64 lowercase hex digits, got {digest!r:.70}")
    dec = _field(m, "decoder", "dict", "", mp)
    _field(dec, "all_logits", "bool", "decoder", mp, required=False)
    _field(m, "vision", "dict", "", mp, required=False)
    _field(m, "processor", "dict", "", mp, required=False)
    rope = _field(m, "rope", "dict", "", mp)
    rtype = _field(rope, "type", "str", "rope", mp, nullable=True)
    _field(rope, "theta", "number", "rope", mp)
    orig = _field(rope, "original_max_position_embeddings", "int", "rope", mp)
    full = _field(rope, "max_position_embeddings", "int", "rope", mp)
    if orig <= 0 or full <= 0:
        raise BundleError(f"{mp}: fields 'rope.original_max_position_embeddings' ({orig}) and "
                          f"'rope.max_position_embeddings' ({full}) must be positive")
    if rtype:
        lengths = set()
        for key in ("short_factor", "long_factor"):
            vals = _field(rope, key, "list", "rope", mp)
            if not vals or not all(_is(v, "number") for v in vals):
                raise BundleError(f"{mp}: field 'rope.{key}' must be a non-empty list of numbers")
            lengths.add(len(vals))
        if len(lengths) != 1:
            raise BundleError(f"{mp}: fields 'rope.short_factor' and 'rope.long_factor' differ in length")
    factor = _field(rope, "attention_factor", "number", "rope", mp, required=False)
    if factor is not None:  # read back: it must be the factor the runtime's tables use
        from .model_facts import rope_attention_factor

        want = rope_attention_factor(full, orig) if rtype else 1.0
        if abs(factor - want) > 1e-6 * max(1.0, abs(want)):
            raise BundleError(f"{mp}: field 'rope.attention_factor' is {factor}, but max_position_embeddings {full} "
                              f"and original_max_position_embeddings {orig} give {want}")
    tokens = _field(m, "tokens", "dict", "", mp)
    stop = _field(tokens, "stop_ids", "list", "tokens", mp, required=False)
    if stop is not None and not all(_is(i, "int") and i >= 0 for i in stop):
        raise BundleError(f"{mp}: field 'tokens.stop_ids' must be a list of token ids (integers >= 0), got {stop!r:.60}")
    from .model_facts import CROP_SIZE, TOKENS_PER_CROP

    # read back: the image pipeline (runtime/image_transform.py, image_layout.py) is built for this geometry only
    for section, key, want in (("processor", "crop_size", CROP_SIZE), ("processor", "num_img_tokens", TOKENS_PER_CROP),
                               ("vision", "crop_size", CROP_SIZE), ("vision", "tokens_per_crop", TOKENS_PER_CROP)):
        got = _field(m.get(section) or {}, key, "int", section, mp, required=False)
        if got is not None and got != want:
            raise BundleError(f"{mp}: field '{section}.{key}' is {got}; this phi3v-edge supports {want} only "
                              "(CLIP ViT-L/14-336 crops, 144 merged tokens each)")


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
