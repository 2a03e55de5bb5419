"""Measure `phi3v-edge export` of the full-size model: wall time, peak RSS, bundle size.

    python -m phi3v_edge.benchmarks.export_bench --workdir /tmp/p3v [--precision int4] [--keep]

Writes a full-size random-weight bf16 checkpoint (benchmarks/full_checkpoint.py) unless one is
already in WORKDIR/ckpt, exports it in a child process (so its peak RSS is the export's alone),
and records the figures in benchmarks/results/export-<precision>-<date>-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="scratch directory (needs ~12 GB free)")
    p.add_argument("--precision", default="int4", choices=("int4", "int8", "fp16"))
    p.add_argument("--vision-precision", default="fp16")
    p.add_argument("--keep", action="store_true", help="keep the bundle afterwards")
    p.add_argument("--note", default="", help="free text recorded with the figures (e.g. machine load)")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    ckpt, bundle = work / "ckpt", work / f"bundle-{a.precision}"
    if not (ckpt / "model.safetensors.index.json").is_file():
        from .full_checkpoint import write_full_checkpoint

        t0 = time.perf_counter()
        write_full_checkpoint(ckpt)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s")
    cmd = [sys.executable, "-m", "phi3v_edge.export.cli", str(ckpt), "--out", str(bundle), "--precision", a.precision,
           "--vision-precision", a.vision_precision, "--force"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(f"export failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    peak_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2  # KiB -> GiB
    size = dir_bytes(bundle)
    files = {f.name: f.stat().st_size for f in sorted(bundle.iterdir())}
    now = dt.datetime.now(dt.timezone.utc)
    device = f"{cpu_name()} ({os.cpu_count()} cores)"
    rec = {"date": now.isoformat(timespec="seconds"), "device": device, "command": " ".join(["phi3v-edge export"] + cmd[3:]),
           "precision": a.precision, "vision_precision": a.vision_precision, "wall_s": round(wall, 1),
           "peak_rss_gib": round(peak_rss_gib, 2), "bundle_gb": round(size / 1e9, 3), "files": files,
           "targets": {"peak_rss_gib": 6.0, "bundle_gb_int4": 2.9}, "note": a.note}
    RESULTS.mkdir(exist_ok=True)
    stem = f"export-{a.precision}-{now:%Y-%m-%d}-cpu{os.cpu_count()}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(rec, indent=2) + "\n")
    md = [f"# Full-size export ({a.precision}, vision {a.vision_precision})", "",
          f"- date: {rec['date']}", f"- device: {device}", f"- command: `{rec['command']}`"]
    md += [f"- note: {a.note}", ""] if a.note else [""]
    md += ["| wall time | peak RSS | bundle size |", "|---|---|---|",
          f"| {wall:.0f} s | {peak_rss_gib:.2f} GiB (target < 6) | {size / 1e9:.3f} GB (target < 2.9 for int4) |", "",
          "| file | bytes |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in files.items()]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(json.dumps(rec, indent=2))
    if not a.keep:
        shutil.rmtree(bundle, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
