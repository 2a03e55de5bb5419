"""Hugging Face checkpoint access: resolve a directory or repo id, read tensors one at a time, save.

Layout: config.json + `model.safetensors`, or shards + `model.safetensors.index.json`
(weight_map: tensor name -> shard file). Tensors are bf16, fp16 or fp32.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
              "processor_config.json", "generation_config.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or that does not fit the model."""


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A local directory, or a Hugging Face repo id resolved through huggingface_hub (cached download)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    s = str(checkpoint)
    if not _REPO_ID.match(s):
        raise CheckpointError(f"checkpoint {s!r} is neither an existing directory nor a Hugging Face repo id (org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is in the export extra
        raise CheckpointError(f"{s!r} looks like a repo id but huggingface_hub is not installed; "
                              "pip install huggingface_hub, or pass a local checkpoint directory") from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(s, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {e}".splitlines()[0]
        raise CheckpointError(
            f"could not fetch {s!r} from the Hugging Face Hub ({why}). If this machine is offline, download the "
            f"checkpoint elsewhere (e.g. `huggingface-cli download {s} --local-dir DIR`) and pass that local DIR") from None


class CheckpointReader:
    """Reads tensors by name, one at a time (safetensors safe_open), across shards."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            self.weight_map = dict(wm)
        elif (self.dir / SINGLE_FILE).is_file():
            self.weight_map = None
        else:
            raise CheckpointError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        files = sorted(set(self.weight_map.values())) if self.weight_map else [SINGLE_FILE]
        self._handles = {}
        for f in files:
            p = self.dir / f
            if not p.is_file():
                raise CheckpointError(f"shard {f} listed in {INDEX_FILE} is missing from {self.dir}")
            try:
                self._handles[f] = safe_open(str(p), framework="pt")
            except Exception as e:
                raise CheckpointError(f"cannot read {p}: {e}") from None
        if self.weight_map is None:
            self.weight_map = {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name`; with `shape`, a mismatch raises an error naming the key and both shapes."""
        t = self._handle(name).get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)} in the checkpoint; the model expects {tuple(shape)}")
        return t if dtype is None else t.to(dtype)

    def numpy(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor `name` as float32 numpy, read with plain file reads (header offsets), not through
        safe_open's memory map: mapped pages stay resident in the process RSS until the file is closed,
        so streaming a 7.6 GB checkpoint through the map would show ~8 GB RSS. Used by the export."""
        path = self.dir / self._file(name)
        header, base = _safetensors_header(path)
        info = header[name]
        if shape is not None and tuple(info["shape"]) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(info['shape'])} in the checkpoint; "
                                  f"the model expects {tuple(shape)}")
        if info["dtype"] not in _NP_DTYPES:
            return self.get(name, dtype=torch.float32).numpy()
        start, end = info["data_offsets"]
        buf = np.empty(end - start, np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(base + start)
            if f.readinto(buf) != buf.nbytes:
                raise CheckpointError(f"{path} is truncated (tensor {name})")
        raw = buf.view(_NP_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bf16 is the high half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    def _file(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.dir}") from None

    def _handle(self, name: str):
        return self._handles[self._file(name)]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)


_NP_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
_HEADERS: dict = {}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> dtype, shape, data_offsets) and the data's base offset; cached per file version."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _HEADERS:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            _HEADERS[key] = (json.loads(f.read(n)), 8 + n)
    return _HEADERS[key]


def load_weights(model: torch.nn.Module, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Copy every parameter of `model` from the checkpoint, by name, checking shapes."""
    reader = CheckpointReader(directory)
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in reader]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {directory} lacks {len(missing)} tensors the model needs: {missing[:5]}{more}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(reader.get(name, shape=tuple(p.shape)).to(dtype))


def save_checkpoint(state: dict[str, torch.Tensor], directory: str | Path, config=None,
                    dtype: torch.dtype | None = torch.bfloat16, max_shard_bytes: int = 2 * 1024 ** 3,
                    side_files_from: str | Path | None = None) -> Path:
    """Write `state` in the Hugging Face layout: shards of at most max_shard_bytes + index (or one file),
    config.json (a Phi3VConfig), and the tokenizer/processor files copied from side_files_from."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        t = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=meta)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if config is not None:
        config.save(out)
    if side_files_from is not None:
        for f in SIDE_FILES:
            src = Path(side_files_from) / f
            if src.is_file():
                shutil.copy(src, out / f)
    return out
