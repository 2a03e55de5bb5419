"""`phi3v-edge bench`: the speed/memory suite, every system in its own process, one table.

    phi3v-edge bench --workdir /tmp/p3v              # full size on CUDA (random weights, real config)
    phi3v-edge bench --device cpu --workdir /tmp/p3v-cpu   # full size on the CPU, short context (minutes)
    phi3v-edge bench --tiny --workdir /tmp/p3v-tiny  # small model on the CPU: a dry run of the same code

Builds (or re-uses) a random-weight checkpoint, exports the phi3v-edge bundles, runs each system,
checks correctness in the same run (float bundle vs the PyTorch reference; CUDA-graph vs no-graph
tokens), and writes JSON, a markdown table and a PNG plot named with date and device.

The full-size CPU mode times a ~128-token prompt with 32 new tokens and one image at num_crops 1
(TTFT split into preprocessing / vision / prefill), in interleaved rounds (--rounds; each system once
per round, medians reported) so that load from other work on the machine spreads over every system.
Rows: the default CPU bundle, the CPU bundle as exported before issue 18 (accuracy_level 0, fp32
vision), onnxruntime-genai on the same weights with its defaults and with one thread per physical
core, and the PyTorch reference in bf16. --candidates adds rows for export / session options.
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

from .measure import copy_bandwidth_gbps, env_versions, median, read_bandwidth_gbps

RESULTS = Path(__file__).resolve().parent / "results"
ROW_KEYS = ("system", "precision", "cuda_graph", "decode_tok_s_1k", "decode_tok_s_4k", "ttft_ms_crops4",
            "preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms_crops16", "peak_gpu_gib", "bundle_gb", "achieved_gbps")
BUNDLES = {  # bundle key -> export options (target = the device); the plain precisions use the target's defaults
    "int4": dict(precision="int4"),
    "fp16": dict(precision="fp16"),
    "fp32": dict(precision="fp32"),
    "int4-acc0": dict(precision="int4", accuracy_level=0, vision_precision="fp32"),  # CPU export before issue 18
    # --candidates (CPU, issue 18 item 2): one change at a time against the default int4 bundle
    "int4-b32": dict(precision="int4", block_size=32),  # the CPU default before block 64
    "int4-b64": dict(precision="int4", block_size=64),
    "int4-b128": dict(precision="int4", block_size=128),
    "int4-lm8": dict(precision="int4", lm_head_precision="int8"),
    "int4-emb8": dict(precision="int4", embedding_precision="int8"),
    "int4-emb32": dict(precision="int4", embedding_precision="fp32"),
    "int4-vis32": dict(precision="int4", vision_precision="fp32"),
}
SESSION_CANDIDATES = {  # name -> session config entries ("so.X": a SessionOptions attribute), default int4 bundle
    "nospin": {"session.intra_op.allow_spinning": "0"},
    "noarena": {"so.enable_cpu_mem_arena": False},
    "noprepack": {"session.disable_prepacking": "1"},
    "opt-basic": {"so.graph_optimization_level": 1},
}
# warmup 0: one short warm-up request per process instead of a full-length one per figure (prefill dominates)
CPU_FULL = dict(runs=1, warmup=0, rounds=3, new_tokens=32, contexts={"short": 130}, crops=[1], max_length=384)


def plan(device: str, tiny: bool = True, candidates: list[str] | None = None) -> list[dict]:
    """The rows: (label, system process, precision, cuda_graph, bundle key, variant, and per-row spec extras)."""
    if device == "cpu" and not tiny:
        from phi3v_edge.runtime.threads import physical_cores

        rows = [
            dict(label="phi3v-edge", system="edge", precision="int4", cuda_graph=False, bundle="int4",
                 variant="cpu default: acc 4, block 64, int8 vision (acc 0)"),
            dict(label="phi3v-edge", system="edge", precision="int4", cuda_graph=False, bundle="int4-acc0",
                 variant="acc 0, fp32 vision (before)"),
            dict(label="onnxruntime-genai", system="ort-genai", precision="int4", cuda_graph=False,
                 variant="its builder, its defaults", threads=None),
            dict(label="onnxruntime-genai", system="ort-genai", precision="int4", cuda_graph=False,
                 variant=f"its builder, {physical_cores()} threads", threads=physical_cores()),
            # the same int4 graphs as the default bundle, run by onnxruntime-genai (export --format genai)
            dict(label="onnxruntime-genai", system="ort-genai", precision="int4", cuda_graph=False,
                 variant="phi3v-edge genai package, its defaults", threads=None, genai_package="int4"),
            dict(label="onnxruntime-genai", system="ort-genai", precision="int4", cuda_graph=False,
                 variant=f"phi3v-edge genai package, {physical_cores()} threads", threads=physical_cores(),
                 genai_package="int4"),
            dict(label="pytorch", system="torch", precision="bf16", cuda_graph=False, torch_dtype="bf16"),
        ]
        for c in candidates or []:
            if c in SESSION_CANDIDATES:
                rows.append(dict(label="phi3v-edge", system="edge", precision="int4", cuda_graph=False, bundle="int4",
                                 variant=f"candidate: {c}", session_config=SESSION_CANDIDATES[c]))
            elif c in BUNDLES:
                rows.append(dict(label="phi3v-edge", system="edge", precision=BUNDLES[c]["precision"],
                                 cuda_graph=False, bundle=c, variant=f"candidate: {c}"))
            elif c.startswith("threads="):
                rows.append(dict(label="phi3v-edge", system="edge", precision="int4", cuda_graph=False, bundle="int4",
                                 variant=f"candidate: {c}", threads=int(c.split("=", 1)[1])))
            else:
                raise SystemExit(f"unknown candidate {c!r}: choose from {', '.join([*BUNDLES, *SESSION_CANDIDATES])} "
                                 "or threads=N")
        return rows
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


def prepare(work: Path, tiny: bool, device: str, log, keys=None) -> tuple[Path, dict[str, Path]]:
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
    for key in keys or (("int4", "fp16") if device == "cuda" else ("int4", "fp32")):
        out = work / f"bundle-{key}-{device}"
        if not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            export_bundle(ckpt, out, target=device, force=True, **BUNDLES[key])
            log(f"exported {key} bundle in {time.perf_counter() - t0:.0f} s")
        bundles[key] = out
    return ckpt, bundles


def prepare_genai(work: Path, ckpt: Path, device: str, keys, log) -> dict[str, Path]:
    """phi3v-edge's onnxruntime-genai packages (export --format genai) of the same checkpoint and options."""
    from phi3v_edge.export.genai import export_genai

    out = {}
    for key in keys:
        path = work / f"genai-{key}-{device}"
        if not (path / "genai_config.json").is_file():
            t0 = time.perf_counter()
            export_genai(ckpt, path, target=device, force=True, **BUNDLES[key])
            log(f"exported the {key} genai package in {time.perf_counter() - t0:.0f} s")
        out[key] = path
    return out


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


def table_row(p: dict, r: dict, settings: dict | None = None) -> dict:
    settings = settings or {"contexts": {"1k": 0, "4k": 0}, "crops": [4, 16]}
    labels, crops = list(settings["contexts"]), list(settings["crops"])
    split = (r.get(f"split_crops{crops[0]}") or {}) if crops else {}
    row = {k: None for k in ROW_KEYS}
    row.update(system=p["label"], precision=p["precision"], cuda_graph=p["cuda_graph"], variant=p.get("variant"),
               preprocess_ms=split.get("preprocess"), vision_ms=split.get("vision"),
               prefill_ms=split.get("prefill"),
               peak_gpu_gib=r.get("peak_gpu_gib"), bundle_gb=r.get("bundle_gb"),
               achieved_gbps=r.get(f"achieved_gbps_{labels[0]}"))
    for label in labels:
        row[f"decode_tok_s_{label}"] = r.get(f"decode_tok_s_{label}")
        row[f"text_prefill_ms_{label}"] = r.get(f"prefill_ms_{label}")
    for c in crops:
        row[f"ttft_ms_crops{c}"] = r.get(f"ttft_ms_crops{c}")
    extra = {k: r[k] for k in ("achieved_gbps_4k", "context_1k", "context_4k", "peak_rss_gib", "build_s",
                               "build_peak_rss_gib", "threads", "export", "rounds", "per_round", "error",
                               "skipped", "wall_s") if r.get(k) is not None}
    extra.update({k: r[k] for k in r if k.startswith(("context_", "step_gb_", "prompt_tokens_", "raw_step_ms_",
                                                      "host_overhead_ms_", "genai_vision_prefill_ms_"))})
    if r.get("model"):
        extra["genai_model"] = r["model"]
    row.update(extra)
    return row


def columns(res: dict) -> list[str]:
    st = res["settings"]
    labels, crops = list(st["contexts"]), list(st["crops"])
    cuda = res.get("device_kind", "cuda") == "cuda"
    cols = ["system", "precision", "variant"] + (["cuda_graph"] if cuda else [])
    cols += [f"decode_tok_s_{x}" for x in labels] + [f"text_prefill_ms_{x}" for x in labels]
    if crops:
        cols += [f"ttft_ms_crops{crops[0]}", "preprocess_ms", "vision_ms", "prefill_ms"]
        cols += [f"ttft_ms_crops{c}" for c in crops[1:]]
    cols += ["peak_gpu_gib"] if cuda else ["peak_rss_gib"]
    return cols + ["bundle_gb", "achieved_gbps"] + ([] if cuda else ["pct_of_read_bw"])


def markdown(res: dict) -> str:
    cols = columns(res)
    fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# phi3v-edge benchmark: {res['device']}", "", f"- date: {res['date']}", f"- command: `{res['command']}`",
             f"- copy bandwidth: {res['copy_bandwidth_gbps']} GB/s (read + write)"
             + (f"; read bandwidth: {res['read_bandwidth_gbps']} GB/s ({res['settings'].get('threads')} threads, "
                "the decode floor's denominator)" if res.get("read_bandwidth_gbps") else ""),
             f"- versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}"]
    st = res["settings"]
    lines.append(f"- settings: contexts {st['contexts']} (prompt tokens, about), {st['new_tokens']} new tokens, "
                 f"crops {st['crops']}, max_length {st['max_length']}, {st['runs']} run(s) after "
                 f"{st['warmup'] or 'one short'} warm-up per process, {st.get('rounds', 1)} interleaved round(s) (medians)")
    if res.get("load_average"):
        la = res["load_average"]
        lines.append(f"- load average (1, 5, 15 min): before {la['before']}, after {la['after']}")
    if res.get("cpu_flags") is not None:
        lines.append(f"- CPU vector features: {', '.join(res['cpu_flags']) or 'none of avx2/avx512/vnni'}")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    c0 = st["crops"][0] if st["crops"] else None
    lines += ["", (f"prefill_ms, preprocess_ms, vision_ms: the image prompt at num_crops {c0} (ttft_ms_crops{c0} = "
                   "their sum); " if c0 else "") + "text_prefill_ms: the text prompt, prompt in to first token out; "
              "achieved_gbps: weight + KV bytes a decode step reads x decode rate"
              + ("; pct_of_read_bw: achieved_gbps over the measured read bandwidth (100 = the floor)."
                 if "pct_of_read_bw" in cols else ".")]
    notes = [f"- {r['system']} {r['precision']} {r.get('variant') or ''}: {r.get('error') or r.get('skipped')}"
             for r in res["rows"] if r.get("error") or r.get("skipped")]
    if notes:
        lines += ["", "Rows without figures:"] + notes
    lines += ["", "Correctness (same run):"] + [f"- {k}: {v}" for k, v in res["correctness"].items()]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Two bar charts (decode tokens/s at 1K, TTFT at num_crops 4) with Pillow: no plotting dependency."""
    from PIL import Image, ImageDraw

    st = res["settings"]
    c0 = st["crops"][0] if st["crops"] else None
    dkey, tkey = f"decode_tok_s_{next(iter(st['contexts']))}", f"ttft_ms_crops{c0}"
    rows = [r for r in res["rows"] if r.get(dkey) or r.get(tkey)]
    W, H, pad, bar_h = 900, 120 + 2 * (40 + 28 * max(1, len(rows))), 10, 22
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((pad, pad), f"phi3v-edge bench - {res['device']} - {res['date'][:10]}", fill="black")
    y = 40
    for key, title in ((dkey, f"decode tokens/s, {next(iter(st['contexts']))} context (higher is better)"),
                       (tkey, f"time to first token, 1 image, num_crops {c0}, ms (lower is better)")):
        d.text((pad, y), title, fill="black")
        y += 20
        vmax = max([r.get(key) or 0 for r in rows] + [1e-9])
        for r in rows:
            v = r.get(key)
            label = f"{r['system']} {r['precision']}{' graph' if r.get('cuda_graph') else ''} {r.get('variant') or ''}"
            d.text((pad, y + 5), label[:40], fill="black")
            if v:
                w = int((W - 330) * v / vmax)
                d.rectangle([260, y, 260 + w, y + bar_h], fill=(70, 120, 200))
                d.text((265 + w, y + 5), f"{v:.4g}", fill="black")
            y += 28
        y += 20
    im.save(path)


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from a system's rows of several rounds: medians of the figures (per_round keeps each round's
    decode rate, prefill and TTFT); an error only when every round failed."""
    ok = [r for r in rounds if "error" not in r and "skipped" not in r]
    if not ok:
        return rounds[0]
    if len(rounds) == 1:
        return ok[0]
    out = dict(ok[0])
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    for k, v in ok[0].items():
        if num(v):
            out[k] = median([r.get(k) for r in ok])
        elif isinstance(v, dict) and v and all(num(x) for x in v.values()):
            out[k] = {kk: median([(r.get(k) or {}).get(kk) for r in ok]) for kk in v}
    out["rounds"] = len(ok)
    out["per_round"] = {k: [r.get(k) for r in ok] for k in ok[0]
                        if k.startswith(("decode_tok_s_", "prefill_ms_", "ttft_ms_", "peak_rss_gib"))}
    if len(ok) < len(rounds):
        out["failed_rounds"] = [r.get("error") for r in rounds if "error" in r]
    return out


def cpu_flags() -> list[str]:
    """The vector features that pick ONNX Runtime's CPU kernels (MatMulNBits int8 paths need VNNI for speed)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="phi3v-edge bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small model on the CPU (dry run of the whole suite)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="cuda (default) or cpu: the full-size model on the CPU with a short context; --tiny "
                         "implies cpu")
    ap.add_argument("--workdir", required=True, help="scratch directory for the checkpoint, bundles and rows")
    ap.add_argument("--results-dir", default=None, help=f"where to write the results (default {RESULTS}; "
                                                        "--tiny: the workdir)")
    ap.add_argument("--name", default=None, help="results file stem (default bench-<date>-<device>)")
    ap.add_argument("--systems", default=None, help="comma-separated subset of: edge, ort-genai, torch, torch-nf4")
    ap.add_argument("--candidates", default=None,
                    help="CPU full size: extra phi3v-edge rows, comma-separated: bundle variants "
                         f"({', '.join(k for k in BUNDLES if k.startswith('int4-') and k != 'int4-acc0')}), session "
                         f"options ({', '.join(SESSION_CANDIDATES)}) or threads=N")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per figure and process (median; default "
                                                           "5, tiny 1, cpu 1)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="full-length warm-up runs per figure (default 1; cpu 0 = one short warm-up request)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds: every system once per round, medians over rounds (default 1, cpu 3)")
    ap.add_argument("--crops", default=None,
                    help="comma-separated num_crops of the image TTFT runs (default 4,16; cpu 1; 'none': no image)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode tokens per run (default 128, tiny 8, cpu 32)")
    ap.add_argument("--genai-build-min-gb", type=float, default=None,
                    help="build onnxruntime-genai's model only with this much memory available (default 22 for "
                         "the full-size model on the CPU, where its builder peaked over 20 GB; 0 = always)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per system process")
    a = ap.parse_args(argv)
    device = "cpu" if a.tiny else (a.device or "cuda")
    cpu_full = device == "cpu" and not a.tiny
    work = Path(a.workdir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    results = Path(a.results_dir) if a.results_dir else (work if a.tiny else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    load_before = [round(x, 2) for x in os.getloadavg()]
    wanted = set(a.systems.split(",")) if a.systems else None
    rows_plan = plan(device, a.tiny, a.candidates.split(",") if a.candidates else None)
    keys = None
    if cpu_full:
        keys = list(dict.fromkeys(p["bundle"] for p in rows_plan if p.get("bundle")
                                  and (not wanted or p["system"] in wanted)))
    ckpt, bundles = prepare(work, a.tiny, device, log, keys)
    genai_keys = list(dict.fromkeys(p["genai_package"] for p in rows_plan if p.get("genai_package")
                                    and (not wanted or p["system"] in wanted) and not skip_reason(p["system"], device)))
    packages = prepare_genai(work, ckpt, device, genai_keys, log) if genai_keys else {}
    if cpu_full:
        base = dict(CPU_FULL, device=device, checkpoint=str(ckpt), workdir=str(work))
        for k, v in (("runs", a.runs), ("rounds", a.rounds), ("new_tokens", a.new_tokens), ("warmup", a.warmup)):
            if v:
                base[k] = v
    else:
        new_tokens = a.new_tokens or (8 if a.tiny else 128)
        base = dict(device=device, checkpoint=str(ckpt), workdir=str(work), runs=a.runs or (1 if a.tiny else 5),
                    warmup=1 if a.warmup is None else a.warmup, new_tokens=new_tokens, crops=[4, 16], rounds=a.rounds or 1,
                    contexts={"1k": 96, "4k": 240} if a.tiny else {"1k": 1024, "4k": 4096 - new_tokens},
                    max_length=2048 if a.tiny else 4096)
    base["build_min_avail_gb"] = a.genai_build_min_gb if a.genai_build_min_gb is not None else (22 if cpu_full else 0)
    if a.crops:
        base["crops"] = [] if a.crops == "none" else [int(c) for c in a.crops.split(",")]
    settings = {k: base[k] for k in ("runs", "warmup", "rounds", "new_tokens", "contexts", "crops", "max_length")}
    read_bw = None
    if device == "cpu":  # measured before the runs, on the idle machine, with the sessions' thread count
        from phi3v_edge.runtime.threads import default_threads

        settings["threads"] = default_threads()
        read_bw = read_bandwidth_gbps(settings["threads"])
    todo = [(i, p) for i, p in enumerate(rows_plan) if not wanted or p["system"] in wanted]
    per_row: dict[int, list[dict]] = {i: [] for i, _ in todo}
    for rnd in range(base["rounds"]):
        for i, p in todo:
            reason = skip_reason(p["system"], device)
            if reason:
                per_row[i].append({"skipped": reason})
                continue
            spec = dict(base, cuda_graph=p["cuda_graph"], bundle=str(bundles.get(p.get("bundle"), "")),
                        **{k: p[k] for k in ("threads", "session_config", "torch_dtype") if p.get(k) is not None})
            if p.get("genai_package"):
                spec["genai_package"] = str(packages[p["genai_package"]])
            log(f"[round {rnd + 1}/{base['rounds']}, {i + 1}] {p['label']} {p['precision']} {p.get('variant') or ''}"
                f"{' (cuda graph)' if p['cuda_graph'] else ''} ...")
            r = run_child(p["system"], spec, work, f"{i}-r{rnd}", a.timeout)
            if "error" in r:
                log(f"    failed: {r['error']}")
            per_row[i].append(r)
    rows, raw = [], {}
    for i, p in todo:
        r = merge_rounds(per_row[i])
        raw[f"{p['label']}|{p['precision']}|{p['cuda_graph']}|{p.get('variant')}"] = r
        rows.append(table_row(p, r, settings))
        if read_bw and rows[-1].get("achieved_gbps"):
            rows[-1]["pct_of_read_bw"] = round(100 * rows[-1]["achieved_gbps"] / read_bw, 1)
    correctness = {}
    if cpu_full:
        correctness.update(cpu_agreement(raw, next(iter(settings["contexts"]))))
    elif not wanted or "edge" in wanted:
        float_key = "fp16" if device == "cuda" else "fp32"
        chk = run_child("check", dict(base, bundle=str(bundles[float_key])), work, "check", a.timeout)
        correctness.update({f"{float_key}_bundle_vs_reference_{k}": v for k, v in chk.items() if k != "wall_s"})
        g, ng = raw.get("phi3v-edge|int4|True|None", {}), raw.get("phi3v-edge|int4|False|None", {})
        if g.get("greedy_ids_1k") and ng.get("greedy_ids_1k"):
            correctness["int4_cuda_graph_tokens_equal_no_graph"] = g["greedy_ids_1k"] == ng["greedy_ids_1k"]
    now = dt.datetime.now(dt.timezone.utc)
    res = {"date": now.isoformat(timespec="seconds"), "device": device_name(device), "device_kind": device,
           "versions": env_versions(), "copy_bandwidth_gbps": copy_bandwidth_gbps(device),
           "read_bandwidth_gbps": read_bw,
           "command": "phi3v-edge bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "settings": settings, "rows": rows, "correctness": correctness,
           "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}}
    if device == "cpu":
        res["cpu_flags"] = cpu_flags()
    stem = a.name or f"bench-{now:%Y-%m-%d}-{slug(res['device'])}"
    (results / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(res))
    plot(res, results / f"{stem}.png")
    print(markdown(res))
    log(f"wrote {results / stem}.{{json,md,png}}")
    return 0


def cpu_agreement(raw: dict, label: str) -> dict:
    """Greedy tokens of the CPU rows on the same prompt: how many leading tokens each shares with the default
    bundle's (random weights make the argmax fragile, so this says 'same model, same prompt', not quality)."""
    rows = {k: v for k, v in raw.items() if v.get(f"greedy_ids_{label}")}
    ref_key = next((k for k in rows if k.startswith("phi3v-edge|int4|False|cpu default")), None)
    if ref_key is None:
        return {}
    ref = rows[ref_key][f"greedy_ids_{label}"]
    out = {}
    for k, v in rows.items():
        if k == ref_key:
            continue
        ids = v[f"greedy_ids_{label}"]
        same = next((n for n, (x, y) in enumerate(zip(ref, ids)) if x != y), min(len(ref), len(ids)))
        out[f"leading_greedy_tokens_equal_to_default_bundle: {k.replace('|False|', ' ').replace('|', ' ')}"] = \
            f"{same} of {min(len(ref), len(ids))}"
    return out


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
