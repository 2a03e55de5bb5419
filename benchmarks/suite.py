"""`phi3v-edge bench`: the speed/memory suite, every system in its own process, one table.

    phi3v-edge bench --workdir /tmp/p3v              # full size on CUDA (random weights, real config)
    phi3v-edge bench --tiny --workdir /tmp/p3v-tiny  # small model on the CPU: a dry run of the same code

Builds (or re-uses) a random-weight checkpoint, exports the phi3v-edge bundles, runs each system,
checks correctness in the same run (float bundle vs the PyTorch reference; CUDA-graph vs no-graph
tokens), and writes JSON, a markdown table and a PNG plot named with date and device.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .measure import copy_bandwidth_gbps, env_versions

RESULTS = Path(__file__).resolve().parent / "results"
ROW_KEYS = ("system", "precision", "cuda_graph", "decode_tok_s_1k", "decode_tok_s_4k", "ttft_ms_crops4",
            "preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms_crops16", "peak_gpu_gib", "bundle_gb", "achieved_gbps")


def plan(device: str) -> list[dict]:
    """The rows: (label, system process, precision, cuda_graph, bundle key)."""
    if device == "cuda":
        return [
            dict(label="phi3v-edge", system="edge", precision="int4", cuda_graph=True, bundle="int4"),
            dict(label="phi3v-edge", system="edge", precision="int4", cuda_graph=False, bundle="int4"),
            dict(label="phi3v-edge", system="edge", precision="fp16", cuda_graph=True, bundle="fp16"),
            dict(label="onnxruntime-genai", system="ort-genai", precision="int4", cuda_graph=True),
            dict(label="pytorch", system="torch", precision="bf16", cuda_graph=False),
            dict(label="pytorch+bnb", system="torch-nf4", precision="nf4", cuda_graph=False),
        ]
    return [
        dict(label="phi3v-edge", system="edge", precision="int4", cuda_graph=False, bundle="int4"),
        dict(label="phi3v-edge", system="edge", precision="fp32", cuda_graph=False, bundle="fp32"),
        dict(label="onnxruntime-genai", system="ort-genai", precision="int4", cuda_graph=False),
        dict(label="pytorch", system="torch", precision="fp32", cuda_graph=False),
        dict(label="pytorch+bnb", system="torch-nf4", precision="nf4", cuda_graph=False),
    ]


def prepare(work: Path, tiny: bool, device: str, log) -> tuple[Path, dict[str, Path]]:
    from phi3v_edge.export.bundle import export_bundle

    ckpt = work / ("ckpt-tiny" if tiny else "ckpt")
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        if tiny:
            from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint

            write_tiny_checkpoint(ckpt, tiny_config(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256))
        else:
            from .full_checkpoint import write_full_checkpoint

            write_full_checkpoint(ckpt, log=log)
        log(f"checkpoint: {ckpt} ({time.perf_counter() - t0:.0f} s)")
    bundles = {}
    for key in (("int4", "fp16") if device == "cuda" else ("int4", "fp32")):
        out = work / f"bundle-{key}-{device}"
        if not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            export_bundle(ckpt, out, key, target=device, force=True)
            log(f"exported {key} bundle in {time.perf_counter() - t0:.0f} s")
        bundles[key] = out
    return ckpt, bundles


def run_child(system: str, spec: dict, work: Path, tag: str, timeout: float) -> dict:
    spec_path, out_path = work / f"spec-{tag}.json", work / f"row-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "phi3v_edge.benchmarks.systems", system, str(spec_path), str(out_path)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if r.returncode or not out_path.is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:300]}
    row = json.loads(out_path.read_text())
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def skip_reason(system: str, device: str) -> str | None:
    import importlib.util

    if system == "ort-genai" and importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai not installed"
    if system == "torch-nf4":
        if device != "cuda":
            return "bitsandbytes NF4 needs CUDA"
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes not installed"
    return None


def table_row(p: dict, r: dict) -> dict:
    split = r.get("split_crops4") or {}
    row = {k: None for k in ROW_KEYS}
    row.update(system=p["label"], precision=p["precision"], cuda_graph=p["cuda_graph"],
               decode_tok_s_1k=r.get("decode_tok_s_1k"), decode_tok_s_4k=r.get("decode_tok_s_4k"),
               ttft_ms_crops4=r.get("ttft_ms_crops4"), preprocess_ms=split.get("preprocess"),
               vision_ms=split.get("vision"), prefill_ms=split.get("prefill", r.get("prefill_ms_1k")),
               ttft_ms_crops16=r.get("ttft_ms_crops16"), peak_gpu_gib=r.get("peak_gpu_gib"),
               bundle_gb=r.get("bundle_gb"), achieved_gbps=r.get("achieved_gbps_1k"))
    extra = {k: r[k] for k in ("achieved_gbps_4k", "context_1k", "context_4k", "peak_rss_gib", "build_s", "error",
                               "skipped", "wall_s") if r.get(k) is not None}
    row.update(extra)
    return row


def markdown(res: dict) -> str:
    cols = ["system", "precision", "cuda_graph", "decode_tok_s_1k", "decode_tok_s_4k", "ttft_ms_crops4", "preprocess_ms",
            "vision_ms", "prefill_ms", "ttft_ms_crops16", "peak_gpu_gib", "bundle_gb", "achieved_gbps"]
    fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# phi3v-edge benchmark: {res['device']}", "", f"- date: {res['date']}", f"- command: `{res['command']}`",
             f"- copy bandwidth: {res['copy_bandwidth_gbps']} GB/s (read + write)",
             f"- versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    notes = [f"- {r['system']} {r['precision']}: {r.get('error') or r.get('skipped')}" for r in res["rows"]
             if r.get("error") or r.get("skipped")]
    if notes:
        lines += ["", "Rows without figures:"] + notes
    lines += ["", "Correctness (same run):"] + [f"- {k}: {v}" for k, v in res["correctness"].items()]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Two bar charts (decode tokens/s at 1K, TTFT at num_crops 4) with Pillow: no plotting dependency."""
    from PIL import Image, ImageDraw

    rows = [r for r in res["rows"] if r.get("decode_tok_s_1k") or r.get("ttft_ms_crops4")]
    W, H, pad, bar_h = 900, 120 + 2 * (40 + 28 * max(1, len(rows))), 10, 22
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((pad, pad), f"phi3v-edge bench - {res['device']} - {res['date'][:10]}", fill="black")
    y = 40
    for key, title in (("decode_tok_s_1k", "decode tokens/s at 1K context (higher is better)"),
                       ("ttft_ms_crops4", "time to first token, 1 image, num_crops 4, ms (lower is better)")):
        d.text((pad, y), title, fill="black")
        y += 20
        vmax = max([r.get(key) or 0 for r in rows] + [1e-9])
        for r in rows:
            v = r.get(key)
            label = f"{r['system']} {r['precision']}{' graph' if r.get('cuda_graph') else ''}"
            d.text((pad, y + 5), label[:34], fill="black")
            if v:
                w = int((W - 330) * v / vmax)
                d.rectangle([260, y, 260 + w, y + bar_h], fill=(70, 120, 200))
                d.text((265 + w, y + 5), f"{v:.4g}", fill="black")
            y += 28
        y += 20
    im.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="phi3v-edge bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small model on the CPU (dry run of the whole suite)")
    ap.add_argument("--workdir", required=True, help="scratch directory for the checkpoint, bundles and rows")
    ap.add_argument("--results-dir", default=None, help=f"where to write the results (default {RESULTS}; "
                                                        "--tiny: the workdir)")
    ap.add_argument("--systems", default=None, help="comma-separated subset of: edge, ort-genai, torch, torch-nf4")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per figure (median; default 5, tiny 1)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode tokens per run (default 128, tiny 8)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per system process")
    a = ap.parse_args(argv)
    device = "cpu" if a.tiny else "cuda"
    work = Path(a.workdir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    results = Path(a.results_dir) if a.results_dir else (work if a.tiny else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    ckpt, bundles = prepare(work, a.tiny, device, log)
    new_tokens = a.new_tokens or (8 if a.tiny else 128)
    base = dict(device=device, checkpoint=str(ckpt), workdir=str(work), runs=a.runs or (1 if a.tiny else 5),
                warmup=1, new_tokens=new_tokens, crops=[4, 16],
                contexts={"1k": 96, "4k": 240} if a.tiny else {"1k": 1024, "4k": 4096 - new_tokens},
                max_length=2048 if a.tiny else 4096)
    wanted = set(a.systems.split(",")) if a.systems else None
    rows, raw = [], {}
    for i, p in enumerate(plan(device)):
        if wanted and p["system"] not in wanted:
            continue
        reason = skip_reason(p["system"], device)
        if reason:
            r = {"skipped": reason}
        else:
            spec = dict(base, cuda_graph=p["cuda_graph"], bundle=str(bundles.get(p.get("bundle"), "")))
            log(f"[{i + 1}] {p['label']} {p['precision']}{' (cuda graph)' if p['cuda_graph'] else ''} ...")
            r = run_child(p["system"], spec, work, f"{i}", a.timeout)
            if "error" in r:
                log(f"    failed: {r['error']}")
        raw[f"{p['label']}|{p['precision']}|{p['cuda_graph']}"] = r
        rows.append(table_row(p, r))
    correctness = {}
    float_key = "fp16" if device == "cuda" else "fp32"
    if not wanted or "edge" in wanted:
        chk = run_child("check", dict(base, bundle=str(bundles[float_key])), work, "check", a.timeout)
        correctness.update({f"{float_key}_bundle_vs_reference_{k}": v for k, v in chk.items() if k != "wall_s"})
        g, ng = raw.get("phi3v-edge|int4|True", {}), raw.get("phi3v-edge|int4|False", {})
        if g.get("greedy_ids_1k") and ng.get("greedy_ids_1k"):
            correctness["int4_cuda_graph_tokens_equal_no_graph"] = g["greedy_ids_1k"] == ng["greedy_ids_1k"]
    now = dt.datetime.now(dt.timezone.utc)
    res = {"date": now.isoformat(timespec="seconds"), "device": device_name(device), "versions": env_versions(),
           "copy_bandwidth_gbps": copy_bandwidth_gbps(device),
           "command": "phi3v-edge bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "settings": {k: base[k] for k in ("runs", "warmup", "new_tokens", "contexts", "crops", "max_length")},
           "rows": rows, "correctness": correctness}
    stem = f"bench-{now:%Y-%m-%d}-{slug(res['device'])}"
    (results / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(res))
    plot(res, results / f"{stem}.png")
    print(markdown(res))
    log(f"wrote {results / stem}.{{json,md,png}}")
    return 0


def device_name(device: str) -> str:
    if device == "cuda":
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "cuda"
    from .export_bench import cpu_name

    return f"{cpu_name()} ({os.cpu_count()} cores)"


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()[:40]


if __name__ == "__main__":
    sys.exit(main())
