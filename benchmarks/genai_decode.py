"""onnxruntime-genai decode speed on packages of the same weights: phi3v-edge's `--format genai` package beside
the package of onnxruntime-genai's own builder (`python -m onnxruntime_genai.models.builder`). CPU.

    python -m phi3v_edge.benchmarks.genai_decode NAME=PACKAGE_DIR [NAME=PACKAGE_DIR ...] [--bundle NAME=BUNDLE_DIR]
        [--prompt-tokens 128] [--new-tokens 64] [--threads N] [--runs 3] [--out benchmarks/results/genai-decode-<date>.md]

Every package gets the same text prompt (its ids from phi3v-edge's processor, fed with append_tokens / named
tensors, greedy, max_length = prompt + new tokens), the same intra-op thread count (genai_config
session_options overlay; onnxruntime-genai's own default uses one thread on a 2-vCPU machine), and is timed over
`runs` generations: decode tokens/s = (new tokens - 1) / (time after the first new token), best run reported.
--bundle adds phi3v-edge's runtime on a bundle of the same weights (its own decode rate), same prompt and threads.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def load(og, path: str, threads: int):
    cfg = og.Config(path)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(cfg)


def model_type(path: str) -> str:
    return json.loads((Path(path) / "genai_config.json").read_text())["model"]["type"]


def one_run(og, model, ids: np.ndarray, new_tokens: int, multimodal: bool) -> tuple[float, float]:
    """-> (seconds to the first new token, decode tokens/s after it)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False)
    g = og.Generator(model, params)
    t0 = time.perf_counter()
    if multimodal:
        nt = og.NamedTensors()
        nt["input_ids"] = ids.astype(np.int32)
        g.set_inputs(nt)
    else:
        g.append_tokens(ids.astype(np.int32))
    g.generate_next_token()
    t1 = time.perf_counter()
    n = 1
    while not g.is_done() and n < new_tokens:
        g.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    return t1 - t0, (n - 1) / (t2 - t1)


def prompt_of(proc, n_tokens: int) -> str:
    """A chat prompt of about n_tokens ids (a sentence repeated)."""
    words = "The quick brown fox jumps over the lazy dog near the river bank. "
    k = 1
    while proc(f"<|user|>\n{words * (k + 1)}<|end|>\n<|assistant|>\n").input_ids.shape[1] <= n_tokens:
        k += 1
    return f"<|user|>\n{words * k}<|end|>\n<|assistant|>\n"


def runtime_row(name: str, path: str, prompt: str, a) -> dict:
    from phi3v_edge.runtime import Phi3VRuntime

    rt = Phi3VRuntime(path, provider="cpu", max_length=a.prompt_tokens + a.new_tokens + 64, threads=a.threads)
    runs = []
    for _ in range(a.runs):
        r = rt.generate(prompt, max_new_tokens=a.new_tokens, stop_ids=())
        runs.append((r.timings.get("ttft", r.timings.get("prefill", 0.0)), r.timings["tokens_per_s"]))
    best = max(runs, key=lambda r: r[1])
    return {"name": name, "path": path, "type": "phi3v-edge bundle", "ttft_s": best[0], "decode_tok_s": best[1],
            "all_decode_tok_s": [r[1] for r in runs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packages", nargs="+", help="NAME=DIR pairs")
    ap.add_argument("--bundle", action="append", default=[], help="NAME=DIR of a phi3v-edge bundle (repeatable)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--note", default="", help="free text for the record (e.g. other work on the machine)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import onnxruntime_genai as og
    from phi3v_edge.runtime.processor import Phi3VProcessor

    from .export_bench import cpu_name

    proc = Phi3VProcessor.from_pretrained(a.packages[0].split("=", 1)[1])
    prompt = prompt_of(proc, a.prompt_tokens)
    ids = proc(prompt).input_ids
    rows = []
    for spec in a.packages:
        name, path = spec.split("=", 1)
        model = load(og, path, a.threads)
        mm = model_type(path) == "phi3v"
        runs = [one_run(og, model, ids, a.new_tokens, mm) for _ in range(a.runs)]
        best = max(runs, key=lambda r: r[1])
        rows.append({"name": name, "path": path, "type": model_type(path), "ttft_s": best[0],
                     "decode_tok_s": best[1], "all_decode_tok_s": [r[1] for r in runs]})
        print(f"{name}: decode {best[1]:.2f} tokens/s (runs {', '.join(f'{r[1]:.2f}' for r in runs)}), "
              f"prompt {best[0]:.2f} s", flush=True)
        del model
    for spec in a.bundle:
        name, path = spec.split("=", 1)
        rows.append(runtime_row(name, path, prompt, a))
        print(f"{name}: decode {rows[-1]['decode_tok_s']:.2f} tokens/s", flush=True)
    date = dt.date.today().isoformat()
    cmd = "python -m phi3v_edge.benchmarks.genai_decode " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [f"# onnxruntime-genai {og.__version__} decode speed, CPU", "", f"- date: {date}",
          f"- device: {cpu_name()}, {os.cpu_count()} vCPUs", f"- command: `{cmd}`",
          (f"- prompt {a.prompt_tokens} token ids (the same for every package), {a.new_tokens} new tokens, greedy, "
           f"intra_op_num_threads {a.threads}, best of {a.runs}")] + ([f"- note: {a.note}"] if a.note else []) + [
          "", "| package | genai model type | decode tokens/s | time to first token (s) | runs (tokens/s) |",
          "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['name']} (`{r['path']}`) | {r['type']} | {r['decode_tok_s']:.2f} | {r['ttft_s']:.2f} | "
                  + ", ".join(f"{x:.2f}" for x in r["all_decode_tok_s"]) + " |")
    out = Path(a.out) if a.out else RESULTS / f"genai-decode-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"date": date, "command": cmd, "rows": rows}, indent=2) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
