"""Continuous batching: aggregate decode tokens/s and per-request latency at 1, 2, 4, 8 concurrent requests, and one
request alone beside a baseline runtime (e.g. the single-request runtime before the engine), same machine, same run.

    python -m phi3v_edge.benchmarks.batching --bundle B [--baseline-bundle OLD --baseline-path SHIM]
        [--concurrency 1,2,4,8] [--new-tokens 32] [--prompt-tokens 64] [--rounds 3] [--out benchmarks/results]

Concurrency c: c text prompts of the same length (distinct words, so no prefix is shared) submitted together to one
Engine(max_batch = the largest c), greedy, max_new_tokens each. Figures per round, medians over rounds:
  decode_tok_s   rows decoded / seconds inside batched decode steps (the engine's own counters): what B rows
                 sharing one read of the weights buys
  e2e_tok_s      generated tokens / wall time from the first submit to the last result (prefills included)
  ttft / e2e     per request, seconds from its submit (p50 and max)
  achieved GB/s  bytes one step must read (decoder weights without the embedding table, plus every row's KV)
                 x steps / seconds inside steps, beside the measured copy bandwidth
Solo: one request alone in a fresh process (its own decode tokens/s from the result's timings), interleaved with
the baseline's process when one is given (PYTHONPATH=--baseline-path puts another phi3v_edge first).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

WORDS = ("amber basil cedar delta ember fjord grove harbor island jasper kettle lagoon meadow nectar orchard pebble "
         "quartz river saffron timber umber valley willow yonder zephyr").split()

SOLO = r"""
import json, sys
from phi3v_edge.runtime import Phi3VRuntime
bundle, prompt, n, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rt = Phi3VRuntime(bundle, provider="cpu", max_length=max_length)
rt.generate(prompt, max_new_tokens=4, stop_ids=())  # warm-up
r = rt.generate(prompt, max_new_tokens=n, stop_ids=())
print(json.dumps({"tokens_per_s": r.timings["tokens_per_s"], "prefill_s": r.timings["prefill"],
                  "tokens": r.token_ids}))
"""


def prompt_for(i: int, words: int) -> str:
    text = " ".join(WORDS[(i * 7 + j * (i + 1)) % len(WORDS)] for j in range(words))
    return f"<|user|>\n{text}<|end|>\n<|assistant|>\n"


def run_solo(bundle: str, prompt: str, n: int, max_length: int, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", SOLO, bundle, prompt, str(n), str(max_length)], env=env,
                         capture_output=True, text=True, timeout=1800, cwd="/")
    if out.returncode:
        raise RuntimeError(f"solo run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_concurrent(engine, c: int, words: int, n: int, weight_bytes: int, kv_row_bytes: int) -> dict:
    prompts = [prompt_for(i, words) for i in range(c)]
    before = engine.stats()
    t0 = time.perf_counter()
    handles = [engine.submit(p, max_new_tokens=n, stop_ids=(), reuse_prefix=False) for p in prompts]
    results = [h.result(timeout=3600) for h in handles]
    wall = time.perf_counter() - t0
    after = engine.stats()
    rows = after["decode_rows"] - before["decode_rows"]
    steps = after["decode_steps"] - before["decode_steps"]
    secs = after["decode_s"] - before["decode_s"]
    ctx = sum(r.prompt_tokens for r in results) / c + n / 2  # mean context of a row during its decode
    step_bytes = weight_bytes + (rows / max(steps, 1)) * ctx * kv_row_bytes
    return {"concurrency": c, "decode_tok_s": rows / secs, "e2e_tok_s": sum(len(r.token_ids) for r in results) / wall,
            "steps": steps, "rows_per_step": rows / max(steps, 1), "achieved_gbps": step_bytes * steps / secs / 1e9,
            "ttft_p50_s": statistics.median(r.timings["ttft"] for r in results),
            "ttft_max_s": max(r.timings["ttft"] for r in results),
            "e2e_p50_s": statistics.median(r.timings["total"] for r in results),
            "e2e_max_s": max(r.timings["total"] for r in results),
            "tokens": [r.token_ids for r in results]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi3v_edge.benchmarks.batching",
                                description="Aggregate decode throughput of the batching engine at several "
                                            "concurrencies, and one request alone beside a baseline runtime.")
    p.add_argument("--bundle", required=True, help="bundle to measure (CPU)")
    p.add_argument("--baseline-bundle", default=None, help="bundle for the baseline runtime (e.g. an older format)")
    p.add_argument("--baseline-path", default=None, help="PYTHONPATH that imports the baseline phi3v_edge")
    p.add_argument("--baseline-label", default="baseline", help="name of the baseline in the table")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated concurrencies (default 1,2,4,8)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--prompt-words", type=int, default=48, help="words per prompt (default 48, ~64 tokens)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, medians reported (default 3)")
    p.add_argument("--max-length", type=int, default=512, help="KV rows per slot (default 512)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the .json and .md record")
    p.add_argument("--tag", default="cpu", help="file name tag (default cpu)")
    a = p.parse_args(argv)

    from phi3v_edge.benchmarks.measure import bundle_decoder_weight_bytes, copy_bandwidth_gbps, read_bandwidth_gbps
    from phi3v_edge.benchmarks.suite import device_name
    from phi3v_edge.runtime.engine import Engine

    conc = [int(x) for x in a.concurrency.split(",")]
    load_before = os.getloadavg()
    read_bw = read_bandwidth_gbps(a.threads)  # before the runs, on the idle machine
    started = datetime.now(timezone.utc)
    solo_prompt = prompt_for(0, a.prompt_words)
    solo = {"new": [], "baseline": []}
    for _ in range(a.rounds):  # interleaved: new, baseline, new, baseline, ...
        solo["new"].append(run_solo(a.bundle, solo_prompt, a.new_tokens, a.max_length, None))
        if a.baseline_bundle:
            solo["baseline"].append(run_solo(a.baseline_bundle, solo_prompt, a.new_tokens, a.max_length,
                                             a.baseline_path))
    eng = Engine(a.bundle, provider="cpu", max_batch=max(conc), max_length=a.max_length, threads=a.threads)
    m = eng.manifest
    dec = m["decoder"]
    weight_bytes = bundle_decoder_weight_bytes(Path(a.bundle), m)
    kv_row_bytes = 2 * dec["num_layers"] * dec["num_kv_heads"] * dec["head_dim"] * eng.decoder.cache.dtype.itemsize
    eng.warmup()
    runs: dict[int, list] = {c: [] for c in conc}
    for _ in range(a.rounds):
        for c in conc:
            runs[c].append(run_concurrent(eng, c, a.prompt_words, a.new_tokens, weight_bytes, kv_row_bytes))
    prompt_tokens = eng.count_tokens(solo_prompt)
    eng.shutdown()
    bw = copy_bandwidth_gbps("cpu")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    rows = []
    for c in conc:
        rs = runs[c]
        rows.append({k: med([r[k] for r in rs]) for k in rs[0] if k not in ("tokens", "concurrency")} |
                    {"concurrency": c})
    base = rows[0]["decode_tok_s"]
    for r in rows:
        r["speedup_vs_1"] = r["decode_tok_s"] / base
    # batched greedy tokens equal the solo ones (request 0's prompt is the solo prompt)
    same = all(run["tokens"][0] == solo["new"][0]["tokens"] for c in conc for run in runs[c])
    res = {"date": started.isoformat(timespec="seconds"), "device": device_name("cpu"),
           "command": "python -m phi3v_edge.benchmarks.batching " + " ".join(argv if argv is not None else sys.argv[1:]),
           "bundle": a.bundle, "decoder": {k: dec.get(k) for k in ("precision", "block_size", "accuracy_level",
                                                                   "io_dtype")},
           "new_tokens": a.new_tokens, "prompt_tokens": prompt_tokens,
           "copy_bandwidth_gbps": bw, "read_bandwidth_gbps": read_bw,
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
           "solo_decode_tok_s": {k: [x["tokens_per_s"] for x in v] for k, v in solo.items() if v},
           "solo_prefill_s": {k: [x["prefill_s"] for x in v] for k, v in solo.items() if v},
           "batched_tokens_equal_solo": same, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"batching-{started.date()}-{a.tag}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res, a.baseline_label))
    print(markdown(res, a.baseline_label))
    print(f"wrote {stem}.json and .md")
    return 0


def markdown(res: dict, baseline_label: str) -> str:
    med = statistics.median
    lines = [f"# Continuous batching, {res['device']}", "",
             f"- date: {res['date']}", f"- command: `{res['command']}`",
             f"- bundle: {res['bundle']} ({res['decoder']})", f"- {res['prompt_tokens']}-token prompts, {res['new_tokens']} new tokens per request, greedy",
             f"- copy bandwidth: {res['copy_bandwidth_gbps']} GB/s; read bandwidth: "
             f"{res.get('read_bandwidth_gbps', '–')} GB/s (the floor: achieved GB/s at most this); "
             "load average before / after: "
             f"{[round(x, 1) for x in res['load_avg_before']]} / {[round(x, 1) for x in res['load_avg_after']]}",
             f"- batched greedy tokens equal to the solo run's: {res['batched_tokens_equal_solo']}", "",
             "| concurrent requests | decode tokens/s (aggregate) | x one request | rows/step | achieved GB/s "
             "| end-to-end tokens/s | TTFT p50 / max (s) | latency p50 / max (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['concurrency']} | {r['decode_tok_s']:.2f} | {r['speedup_vs_1']:.2f} | "
                     f"{r['rows_per_step']:.2f} | {r['achieved_gbps']:.1f} | {r['e2e_tok_s']:.2f} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_max_s']:.2f} | {r['e2e_p50_s']:.2f} / {r['e2e_max_s']:.2f} |")
    lines += ["", "One request alone (fresh process each round, interleaved), decode tokens/s:", ""]
    for k, v in res["solo_decode_tok_s"].items():
        name = "this engine" if k == "new" else baseline_label
        lines.append(f"- {name}: median {med(v):.2f} (rounds: {', '.join(f'{x:.2f}' for x in v)}); prefill "
                     f"median {med(res['solo_prefill_s'][k]):.2f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
