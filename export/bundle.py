"""Checkpoint -> bundle: resolve the checkpoint, build vision.onnx and decoder.onnx, copy the tokenizer
and processor files, write manifest.json — all in a temporary directory renamed into place at the end,
so a failed or interrupted export never leaves something that looks like a bundle.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

from phi3v_edge.models.checkpoint import SIDE_FILES, CheckpointReader, resolve_checkpoint
from phi3v_edge.models.config import ASSETS_DIR, Phi3VConfig
from phi3v_edge.runtime import bundle as fmt
from phi3v_edge.runtime.model_facts import CROP_SIZE

from .decoder_graph import build_decoder
from .options import ACCURACY_LEVELS, PRECISIONS, TARGETS, VISION_PRECISIONS, ExportError, check_choice
from .options import CLI_BLOCK_SIZES as BLOCK_SIZES
from .vision_graph import build_vision, int8_block_size

REQUIRED_SIDE_FILES = ("tokenizer.json", "preprocessor_config.json")
PARTIAL_LOCK = ".export.lock"  # inside a partial directory: flock-ed by the export writing it
UNLOCKED_GRACE_S = 60  # a partial directory without a lock file is left alone for this long (it may be starting)
log = logging.getLogger("phi3v_edge")


def default_io_dtype(precision: str, target: str) -> str:
    """Activations: fp32 for the fp32 precision and for CPU targets, fp16 on CUDA."""
    return "float32" if precision == "fp32" or target == "cpu" else "float16"


CPU_BLOCK_SIZE = 64  # quantization block of the CPU target's int4/int8 weights (32 elsewhere)
DEFAULT_BLOCK_SIZE = 32


def cpu_defaults(precision: str, target: str, vision_precision: str | None, accuracy_level: int | None,
                 block_size: int | None = None, vision_accuracy_level: int | None = None
                 ) -> tuple[str | None, int, int, int]:
    """The CPU target's fast defaults (quality: benchmarks/results/quality-cpu-2026-12-01.md; speed:
    benchmarks/results/cpu-candidates-2026-12-02.md): accuracy_level 4 for the quantized decoder (int8
    activations in MatMulNBits), an int8 vision encoder at accuracy_level 0, and block 64 (half the scale bytes
    of block 32: a memory-bound decode step reads 10 % less, and MLAS's prepacked weights take 0.7 GiB less
    RSS; on the demo model block 64 is as good as 32: 94.7 % vs 94.3 %, KL 7.3e-4 vs 8.9e-4).
    The vision encoder is compute-bound (hundreds of rows per matmul), where MLAS's fp32 path over the int8
    weights runs as fast as fp32 weights and its int8-activation path on an AVX2 CPU is 1.75x slower (one image
    at num_crops 1: 5.03 vs 8.84 s, benchmarks/results/vision-accuracy-2026-12-02.md), so its level is 0 unless
    asked (vision_accuracy_level, or accuracy_level for both graphs). CUDA (and float precisions) keep
    accuracy_level 0, block 32 and the vision precision of the io dtype.
    -> (vision_precision, accuracy_level, vision_accuracy_level, block_size)."""
    fast = target == "cpu" and precision in ("int4", "int8")
    if vision_accuracy_level is None:
        vision_accuracy_level = 0 if accuracy_level is None else accuracy_level
    if accuracy_level is None:
        accuracy_level = 4 if fast else 0
    if vision_precision is None and fast:
        vision_precision = "int8"
    if block_size is None:
        block_size = CPU_BLOCK_SIZE if fast else DEFAULT_BLOCK_SIZE
    return vision_precision, accuracy_level, vision_accuracy_level, block_size


def fit_block_size(cfg: Phi3VConfig, block_size: int, asked: int | None) -> int:
    """The default CPU block (64) where it divides the decoder's input sizes, else 32; an asked size as is (the
    graph builders reject one that does not divide)."""
    if asked is None and (cfg.hidden_size % block_size or cfg.intermediate_size % block_size):
        return DEFAULT_BLOCK_SIZE
    return block_size


def resolve_options(precision: str, target: str, vision_precision: str | None, block_size: int | None,
                    accuracy_level: int | None, vision_accuracy_level: int | None = None
                    ) -> tuple[str, str, int, int, str, int]:
    """Check the export options (ExportError naming the bad one) and fill the defaults, before any work:
    -> (target, vision_precision, accuracy_level, vision_accuracy_level, io_dtype, block_size). The graph
    builders check the block size against the model's sizes (export/options.py holds every check)."""
    check_choice(precision, PRECISIONS, "precision")
    target = resolve_target(check_choice(target, TARGETS, "target"))
    if block_size is not None:
        check_choice(block_size, BLOCK_SIZES, "block size")
    vision_precision, accuracy_level, vision_accuracy_level, block_size = cpu_defaults(
        precision, target, vision_precision, accuracy_level, block_size, vision_accuracy_level)
    check_choice(accuracy_level, ACCURACY_LEVELS, "accuracy level")
    check_choice(vision_accuracy_level, ACCURACY_LEVELS, "vision accuracy level")
    io_dtype = default_io_dtype(precision, target)
    if vision_precision is None:
        vision_precision = "fp32" if io_dtype == "float32" else "fp16"
    check_choice(vision_precision, VISION_PRECISIONS, "vision precision")
    return target, vision_precision, accuracy_level, vision_accuracy_level, io_dtype, block_size


def resolve_target(target: str) -> str:
    """'auto' -> the provider the runtime would pick on this machine (runtime.session.resolve_provider): 'cuda'
    when onnxruntime's CUDA provider is usable here, else 'cpu' (also without onnxruntime). 'cuda' and 'cpu'
    are returned as they are: exporting for a GPU machine needs no GPU."""
    if target != "auto":
        return target
    try:
        from phi3v_edge.runtime.session import resolve_provider
    except ImportError:  # onnxruntime is not installed: nothing here could run a CUDA bundle
        chosen = "cpu"
    else:
        chosen = resolve_provider("auto")
    log.info("export target auto -> %s", chosen)
    return chosen


def export_bundle(checkpoint: str | Path, out_dir: str | Path, precision: str = "int4", *,
                  target: str = "auto", vision_precision: str | None = None, block_size: int | None = None,
                  accuracy_level: int | None = None, vision_accuracy_level: int | None = None,
                  symmetric: bool = True, lm_head_precision: str | None = None,
                  embedding_precision: str | None = None, all_logits: bool = False, force: bool = False,
                  progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Export `checkpoint` (directory or HF repo id) to a bundle at `out_dir`; returns its path.

    precision: decoder weights (fp32/fp16 keep float MatMul; int8/int4 use MatMulNBits).
    target: "cuda" (fp16 activations) or "cpu" (fp32 activations); fp32 precision is fp32 everywhere;
        "auto" (default): cuda when onnxruntime's CUDA provider is usable on this machine, else cpu.
    vision_precision: default fp16 on CUDA, int8 on CPU for int4/int8 decoders, else fp32 (and for fp32).
    block_size: quantization block of int4/int8 weights (32, 64 or 128); default 64 for CPU int4/int8, else 32.
    accuracy_level: MatMulNBits accuracy_level (0 or 4) of the decoder, and of the vision encoder unless
        vision_accuracy_level is given; default 4 for the decoder of CPU int4/int8 bundles, else 0.
    vision_accuracy_level: the vision encoder's (int8 only); default accuracy_level when that is given, else 0."""
    asked = block_size
    target, vision_precision, accuracy_level, vision_accuracy_level, io_dtype, block_size = resolve_options(
        precision, target, vision_precision, block_size, accuracy_level, vision_accuracy_level)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force (force=True) to replace it")

    src = resolve_checkpoint(checkpoint)
    cfg = Phi3VConfig.from_json(src)
    block_size = fit_block_size(cfg, block_size, asked)
    reader = CheckpointReader(src)
    _check_keys(reader, cfg)

    with staged_output(out) as tmp:
        vision = build_vision(reader, cfg, tmp, precision=vision_precision,
                              io_dtype="float16" if vision_precision == "fp16" or io_dtype == "float16" and
                              vision_precision != "fp32" else "float32",
                              block_size=int8_block_size(cfg, block_size) if vision_precision == "int8" else block_size,
                              accuracy_level=vision_accuracy_level,
                              progress=(lambda i, n: progress("vision", i, n)) if progress else None)
        decoder = build_decoder(reader, cfg, tmp, precision=precision, io_dtype=io_dtype, block_size=block_size,
                                symmetric=symmetric, lm_head_precision=lm_head_precision,
                                embedding_precision=embedding_precision, all_logits=all_logits,
                                accuracy_level=accuracy_level, progress=(lambda i, n: progress("decoder", i, n)) if progress else None)
        side = _copy_side_files(src, tmp)
        manifest = _manifest(cfg, src, checkpoint, tmp, vision, decoder, side)
        (tmp / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@contextlib.contextmanager
def staged_output(out: Path):
    """Write an export into a locked .NAME.partial-* directory beside `out` (stale ones of the same target are
    removed first); on success it replaces `out` in one rename, on any failure it is removed. Shared by the
    bundle and the onnxruntime-genai package exports."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(out):
        log.warning("removed %s, left by an interrupted export of %s", stale, out)
    tmp, lock = _make_partial_dir(out)
    try:
        yield tmp
        _release(tmp, lock)
        lock = None
        publish(tmp, out)
    except BaseException:
        _release(tmp, lock)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished partial directory to `out`; an existing `out` (force) is replaced only now."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def partial_dirs(out: Path) -> list[Path]:
    """The temporary directories exports of `out` create beside it (.NAME.partial-*), running or left behind."""
    return sorted(p for p in out.parent.glob(f".{glob.escape(out.name)}.partial-*") if p.is_dir())


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the partial directories of `out` that no running export holds (their lock file is not locked, or
    they have none and are older than UNLOCKED_GRACE_S); returns the removed ones. A directory whose lock is
    held by a running export is never touched. Without fcntl (Windows) nothing is removed."""
    removed = []
    for d in partial_dirs(out):
        if _in_use(d):
            log.warning("%s belongs to a running export of %s: left alone", d, out)
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _in_use(d: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # no flock: cannot tell, so keep it
        return True
    try:
        fd = os.open(d / PARTIAL_LOCK, os.O_RDWR)
    except FileNotFoundError:  # an export just starting (or one finishing) has none for a moment
        return time.time() - d.stat().st_mtime < UNLOCKED_GRACE_S
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # held: a running export
    finally:
        os.close(fd)  # closing drops a lock we got
    return False


def _make_partial_dir(out: Path) -> tuple[Path, int | None]:
    """A new .NAME.partial-* directory beside `out`, created with the umask's mode (like mkdir, unlike mkdtemp's
    0700: the bundle must be readable by whoever the umask allows), and the fd of its flock-ed lock file."""
    while True:
        d = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(d, 0o777)  # the umask applies
            break
        except FileExistsError:
            continue
    fd = os.open(d / PARTIAL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    return d, fd


def _release(d: Path, fd: int | None) -> None:
    """Drop the lock file of a partial directory (before it becomes the bundle, or is removed)."""
    if fd is None:
        return
    try:
        (d / PARTIAL_LOCK).unlink()
    except FileNotFoundError:
        pass
    os.close(fd)


def _check_keys(reader: CheckpointReader, cfg: Phi3VConfig) -> None:
    """Every tensor the model needs is present with its expected shape (read from headers only)."""
    import torch

    from phi3v_edge.models.modeling import Phi3VForCausalLM

    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    for name, p in model.named_parameters():
        if name not in reader:
            raise ExportError(f"checkpoint {reader.dir} is missing tensor {name} (expected shape {tuple(p.shape)})")
        shape = reader.shape(name)
        if shape != tuple(p.shape):
            raise ExportError(f"tensor {name} has shape {shape} in the checkpoint; the config implies {tuple(p.shape)}")


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer/processor/generation files: from the checkpoint, else (with a note) the real Phi-3.5-vision
    files shipped with phi3v-edge (same tokenizer for every Phi-3.5-vision checkpoint)."""
    copied = []
    for f in SIDE_FILES:
        p = src / f
        if not p.is_file() and f in REQUIRED_SIDE_FILES:
            p = ASSETS_DIR / f
        if p.is_file():
            shutil.copyfile(p, dst / f)  # the umask sets the mode, not the checkpoint file's
            copied.append(f)
    return copied


def _manifest(cfg: Phi3VConfig, src: Path, checkpoint, tmp: Path, vision: dict, decoder: dict, side: list[str]) -> dict:
    pre = json.loads((tmp / "preprocessor_config.json").read_text())
    files = [p.name for p in tmp.iterdir() if p.is_file() and p.name not in (fmt.MANIFEST, PARTIAL_LOCK)]
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(checkpoint), "resolved_path": str(src)},
        "decoder": decoder,
        "vision": vision,
        "rope": {
            "type": cfg.rope_type,
            "theta": cfg.rope_theta,
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings,
            "attention_factor": cfg.rope_attention_factor,
            "short_factor": cfg.rope_short_factor,
            "long_factor": cfg.rope_long_factor,
        },
        "tokens": {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id,
                   "stop_ids": list(cfg.stop_ids), "vocab_size": cfg.vocab_size},
        "processor": {"num_crops": int(pre.get("num_crops", 4)), "num_img_tokens": cfg.num_img_tokens,
                      "crop_size": CROP_SIZE, "files": side},
        "files": fmt.describe_files(tmp, files),
    }
