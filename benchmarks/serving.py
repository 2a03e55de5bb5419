"""Serving benchmark: `phi3v-edge serve` (a child process on 127.0.0.1) under 1, 4, 8 and 16 concurrent
streaming clients.

    python -m phi3v_edge.benchmarks.serving                      # the demo model's INT4 bundle (exported once)
    python -m phi3v_edge.benchmarks.serving --bundle DIR --max-tokens 16 --concurrency 1 4
    ... --out benchmarks/results/serving-2026-12-01              # writes .json and .md

Every request is one of the demo's example questions with its image(s) as data URLs, greedy, `ignore_eos` and
`max_tokens` fixed, so every request generates the same number of tokens. Each client is a thread with its own
keep-alive HTTP connection that sends its next request as soon as the previous one ends (closed loop).
Per level: requests/s and generated tokens/s over the level's wall time; p50 / p99 of time to first token
(request sent -> first content chunk received) and end-to-end latency (-> `data: [DONE]`); and the server's own
cost: HTTP time to first token minus the engine's own for the same request (submit -> first token, plus the wait
for the first token that has text; returned by the `timings` extra). A warm-up round runs first and is not counted.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DEFAULT_LEVELS = (1, 4, 8, 16)


def device_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def example_requests(model: str, max_tokens: int, ignore_eos: bool, text_only: bool = False) -> list[dict]:
    """One request body per demo example question (its images as data URLs, or none when text_only)."""
    from phi3v_edge.models.demo import load_questions

    out = []
    for q in load_questions():
        parts = [] if text_only else [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                base64.b64encode(Path(p).read_bytes()).decode()}}
            for p in q["images"]]
        out.append({"model": model, "messages": [{"role": "user", "content": parts + [
            {"type": "text", "text": q["question"]}]}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True}, "timings": True})
    return out


def one_request(client, url: str, body: dict) -> dict:
    """Stream one request; times in seconds from just before it is sent."""
    t0 = time.perf_counter()
    first = None
    usage = timings = None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if first is None and any(c["delta"].get("content") for c in obj.get("choices", [])):
                first = time.perf_counter()
            usage = obj.get("usage") or usage
            timings = obj.get("timings") or timings
    end = time.perf_counter()
    t = timings[0]
    return {"ttft": first - t0, "e2e": end - t0, "engine_ttft": t["ttft"], "before_submit": t["server_before_submit"],
            "token_to_loop": t.get("server_token_to_loop", 0.0),
            "first_text_after_token": t.get("first_text_after_token", 0.0), "tokens": usage["completion_tokens"],
            # perf_counter is CLOCK_MONOTONIC on Linux: the server's readings compare with this process's
            "to_server": t["server_clock_arrival"] - t0, "to_client": first - t.get("server_clock_first_text", first),
            "prompt_tokens": usage["prompt_tokens"]}


def run_level(url: str, bodies: list[dict], clients: int, total: int) -> dict:
    import httpx

    lock = threading.Lock()
    counter = iter(range(total))
    rows: list[dict] = []

    def worker():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                rows.append(one_request(client, url, bodies[i % len(bodies)]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    return summarize(rows, wall, clients)


def health_rtt(url: str, n: int = 100) -> dict:
    """Round trips of GET /health on one keep-alive connection: the machine's floor for any HTTP exchange."""
    import httpx

    with httpx.Client(timeout=30) as client:
        for _ in range(10):
            client.get(url + "/health")
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.get(url + "/health")
            ts.append(time.perf_counter() - t0)
    return {"p50_ms": 1e3 * pct(ts, 50), "min_ms": 1e3 * min(ts), "p99_ms": 1e3 * pct(ts, 99)}


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def summarize(rows: list[dict], wall: float, clients: int) -> dict:
    ttft = [r["ttft"] for r in rows]
    e2e = [r["e2e"] for r in rows]
    # the engine's time to its first token WITH text (a token may carry none until the next one completes it)
    engine_text = [r["engine_ttft"] + r["first_text_after_token"] for r in rows]
    over = [r["ttft"] - e for r, e in zip(rows, engine_text)]
    tokens = sum(r["tokens"] for r in rows)
    return {"clients": clients, "requests": len(rows), "wall_s": wall, "requests_per_s": len(rows) / wall,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens,
            "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in rows])),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "e2e_p50_ms": 1e3 * pct(e2e, 50), "e2e_p99_ms": 1e3 * pct(e2e, 99),
            "engine_ttft_p50_ms": 1e3 * pct([r["engine_ttft"] for r in rows], 50),
            "first_text_after_token_p50_ms": 1e3 * pct([r["first_text_after_token"] for r in rows], 50),
            "overhead_p50_ms": 1e3 * pct(over, 50), "overhead_p99_ms": 1e3 * pct(over, 99),
            "overhead_min_ms": 1e3 * min(over),
            "before_submit_p50_ms": 1e3 * pct([r["before_submit"] for r in rows], 50),
            "token_to_loop_p50_ms": 1e3 * pct([r["token_to_loop"] for r in rows], 50),
            "to_server_p50_ms": 1e3 * pct([r["to_server"] for r in rows], 50),
            "to_client_p50_ms": 1e3 * pct([r["to_client"] for r in rows], 50)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_markdown(path: Path, rec: dict) -> None:
    lines = [f"# Serving benchmark: `phi3v-edge serve`, {rec['bundle_name']} ({rec['date']})", "",
             f"- device: {rec['device']} ({rec['cpus']} CPUs), provider {rec['provider']}, commit {rec['commit']}",
             f"- command: `{rec['command']}`",
             f"- server: `{' '.join(rec['server_args'])}`",
             f"- workload: the demo's {rec['distinct_prompts']} example questions "
             f"{'without images' if rec.get('text_only') else 'with their images as data URLs'}, "
             f"greedy, {rec['max_tokens']} generated tokens each (ignore_eos={rec['ignore_eos']}), closed-loop "
             "streaming clients (one keep-alive connection each), after a warm-up round",
             f"- load average before / after: {rec['loadavg_before']} / {rec['loadavg_after']}"
             + (f" ({rec['note']})" if rec.get("note") else ""),
             f"- GET /health round trip on this machine during the run (the floor of any HTTP exchange): p50 "
             f"{rec['health_rtt']['p50_ms']:.2f} ms, min {rec['health_rtt']['min_ms']:.2f} ms, p99 "
             f"{rec['health_rtt']['p99_ms']:.2f} ms", "",
             "| clients | requests | req/s | tokens/s | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms "
             "| engine TTFT p50 ms | first text after first token p50 ms | server overhead p50 ms | overhead p99 ms "
             "| of which before submit p50 ms "
             "| token to event loop p50 ms | request to server p50 ms | first chunk to client p50 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rec["levels"]:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['e2e_p50_ms']:.1f} | "
                     f"{r['e2e_p99_ms']:.1f} | {r['engine_ttft_p50_ms']:.1f} | "
                     f"{r['first_text_after_token_p50_ms']:.1f} | {r['overhead_p50_ms']:.2f} | "
                     f"{r['overhead_p99_ms']:.2f} | {r['before_submit_p50_ms']:.2f} | "
                     f"{r['token_to_loop_p50_ms']:.2f} | {r['to_server_p50_ms']:.2f} | {r['to_client_p50_ms']:.2f} |")
    lines += ["", "TTFT: request sent -> first content chunk at the client. E2E: -> `data: [DONE]`. Engine TTFT: "
              "the engine's own submit -> first token (image decoding, HD transform, vision encoder, queue, "
              "prefill) for the same requests; a first token with no text of its own (part of a multi-byte "
              "character, a special token) shows as 'first text after first token' (the engine's streaming, "
              "measured in the server). Server overhead: HTTP TTFT minus (engine TTFT + that), per request (HTTP, "
              "JSON, base64, thread hand-offs, SSE framing, the client's parsing); of it, 'before submit' is "
              "the server's time from the request's start to Engine.submit (body, JSON, images, waiting for a "
              "free worker thread) and 'token to event loop' the hand-off of the first token from the engine's "
              "thread to the server's event loop (both measured inside the server); 'request to server' is the "
              "client's send -> the app has the request (connection, HTTP parsing, routing) and 'first chunk to "
              "client' the first text chunk's send -> the client has parsed it (CLOCK_MONOTONIC in both "
              "processes)."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi3v_edge.benchmarks.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle directory (default: the demo model's INT4 CPU bundle)")
    p.add_argument("--provider", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_LEVELS), metavar="C")
    p.add_argument("--requests-per-client", type=int, default=4, metavar="R",
                   help="requests per level = max(--min-requests, C * R); default 4")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-ignore-eos", action="store_true", help="let the model stop on its own (shorter replies)")
    p.add_argument("--text-only", action="store_true",
                   help="the questions without their images (for the full-size model on a CPU, where one image's "
                        "prefill takes seconds)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `phi3v-edge serve` (repeatable)")
    p.add_argument("--note", default="", help="a note for the record (e.g. other work on the machine)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = p.parse_args(argv)

    from phi3v_edge.runtime.server.launch import ServeProcess

    if a.bundle is None:
        from phi3v_edge.models.demo import demo_bundle

        bundle = demo_bundle("cpu" if a.provider == "cpu" else a.provider)
    else:
        bundle = Path(a.bundle)
    model = "bench"
    server_args = ["--provider", a.provider, "--max-batch", str(a.max_batch), "--max-length", str(a.max_length),
                   "--served-model-name", model, "--max-queue", "256", "--log-level", "warning", *a.server_arg]
    bodies = example_requests(model, a.max_tokens, not a.no_ignore_eos, a.text_only)
    load_before = [round(x, 2) for x in os.getloadavg()]
    levels = []
    log_path = Path(a.out + ".server.log") if a.out else None
    with ServeProcess(bundle, server_args, log_path=log_path) as srv:
        print(f"server {srv.url} ({bundle.name}); warming up", file=sys.stderr)
        run_level(srv.url, bodies, min(4, a.max_batch), len(bodies))
        floor = health_rtt(srv.url)
        print(f"GET /health round trip: p50 {floor['p50_ms']:.2f} ms, min {floor['min_ms']:.2f} ms", file=sys.stderr)
        for c in a.concurrency:
            total = max(a.min_requests, c * a.requests_per_client)
            r = run_level(srv.url, bodies, c, total)
            levels.append(r)
            print(f"{c:>3} clients: {r['requests']} requests in {r['wall_s']:.1f} s, {r['requests_per_s']:.2f} req/s, "
                  f"{r['tokens_per_s']:.1f} tok/s; TTFT p50 {r['ttft_p50_ms']:.1f} p99 {r['ttft_p99_ms']:.1f} ms; "
                  f"E2E p50 {r['e2e_p50_ms']:.1f} p99 {r['e2e_p99_ms']:.1f} ms; overhead p50 "
                  f"{r['overhead_p50_ms']:.2f} ms", file=sys.stderr)
    if log_path is not None and log_path.exists():
        log_path.unlink()
    rec = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name(),
           "cpus": os.cpu_count(), "provider": a.provider, "commit": git_commit(), "bundle_name": bundle.name,
           "command": "python -m phi3v_edge.benchmarks.serving "
                      + shlex.join(argv if argv is not None else sys.argv[1:]),
           "server_args": server_args, "max_tokens": a.max_tokens, "ignore_eos": not a.no_ignore_eos,
           "distinct_prompts": len(bodies), "text_only": a.text_only, "loadavg_before": load_before,
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "note": a.note, "health_rtt": floor,
           "levels": levels}
    print(json.dumps(rec, indent=1))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rec, indent=1) + "\n")
        write_markdown(out.with_suffix(".md"), rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
