"""Write a full-size Phi-3.5-vision checkpoint with random weights (speed does not depend on the values).

Real config (models/assets/phi35v/config.json), real key names, bf16, sharded safetensors + index,
tokenizer and processor files: exactly the layout of microsoft/Phi-3.5-vision-instruct. Shards are
generated and written one at a time, so memory stays around one shard.

    python -m phi3v_edge.benchmarks.full_checkpoint OUT_DIR [--shard-gb 4.5] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from phi3v_edge.models.checkpoint import INDEX_FILE, SIDE_FILES
from phi3v_edge.models.config import ASSETS_DIR, Phi3VConfig
from phi3v_edge.models.modeling import Phi3VForCausalLM


def _init(name: str, shape, g: torch.Generator) -> torch.Tensor:
    if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "pre_layrnorm.weight")):
        return torch.ones(shape, dtype=torch.bfloat16)
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(0.0, 0.02, generator=g)
    return t.to(torch.bfloat16)


def write_full_checkpoint(out: str | Path, cfg: Phi3VConfig | None = None, shard_gb: float = 4.5, seed: int = 0,
                          log=print) -> Path:
    from safetensors.torch import save_file

    cfg = cfg or Phi3VConfig.phi35v()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    limit = int(shard_gb * 1e9)
    groups, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        t0 = time.perf_counter()
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: _init(name, shape, g) for name, shape in group}
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * 2
        del shard
        log(f"  {fname}: {len(group)} tensors in {time.perf_counter() - t0:.1f} s")
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save(out)
    for f in SIDE_FILES:
        if (ASSETS_DIR / f).is_file():
            shutil.copy(ASSETS_DIR / f, out / f)
    log(f"wrote {out}: {len(weight_map)} tensors, {total / 1e9:.2f} GB")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="directory to write the checkpoint into")
    p.add_argument("--shard-gb", type=float, default=4.5, help="max shard size in GB (default 4.5)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_full_checkpoint(a.out, shard_gb=a.shard_gb, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
