"""One decode step, graph against graph: phi3v-edge bundles (through the runtime's own `Decoder.step`) beside
onnxruntime-genai packages (their model.onnx on a plain ONNX Runtime session), all in ONE process, interleaved,
with the same session options (intra-op threads, ORT_ENABLE_ALL). The whole-system suite runs each system in
its own process, and on a VM whose speed drifts between processes its rounds spread by +-8 %; here every graph
is timed a few steps at a time, round after round, so drift hits all of them alike.

    python -m phi3v_edge.benchmarks.decode_step NAME=DIR [NAME=DIR ...] [--context 150] [--rows 1,4]
        [--steps 10] [--rounds 3] [--threads N] [--profile] [--out benchmarks/results/decode-step-<date>]

DIR is a bundle (manifest.json: `Decoder.step` over `rows` slots whose caches hold `context` positions) or an
onnxruntime-genai package (genai_config.json: its graph with `context` past positions; where it does not share
past and present, ORT allocates the present and copies the past each step, as onnxruntime-genai's CPU loop does).
Cache contents are zeros (attention costs the same). Per graph and row count: the median step time over rounds
(each round: the median of `steps` steps after one untimed step), its decode tokens/s (rows / step), bytes one
step must read (weights without the embedding table + every row's KV), achieved GB/s, and that as a share of
the CPU read bandwidth measured before the runs (benchmarks/measure.py). --profile adds ONNX Runtime's per-op
time of one step, summed by operator type (what the step's time is spent on).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

RESULTS = Path(__file__).resolve().parent / "results"


def session_options(threads: int, profile_prefix: str | None = None) -> ort.SessionOptions:
    """The options phi3v-edge's sessions use (runtime/session.py), for the genai graphs too."""
    from phi3v_edge.runtime.session import session_options as ours

    so = ours(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


class BundleStep:
    """A bundle's decoder through the runtime's Decoder (runtime/decode.py), `rows` slots at `context` positions."""

    kind = "phi3v-edge bundle"

    def __init__(self, path: Path, rows: int, context: int, threads: int, profile: str | None = None):
        from phi3v_edge.runtime import bundle as fmt
        from phi3v_edge.runtime.decode import Decoder

        from .measure import bundle_decoder_weight_bytes, decoder_bytes_per_step

        m = fmt.load_manifest(path)
        self.rows, self.context = rows, context
        self.dec = Decoder(path / fmt.DECODER_FILE, m["rope"], max_length=context + 64, max_batch=rows,
                           threads=threads)
        if profile:  # a second session of the same graph, profiled (the timed one stays unprofiled)
            self.dec.session = ort.InferenceSession(str(path / fmt.DECODER_FILE), session_options(threads, profile),
                                                    providers=["CPUExecutionProvider"])
            self.dec._steps.clear()
        d = m["decoder"]
        self.step_bytes = decoder_bytes_per_step(bundle_decoder_weight_bytes(path, m), d["num_layers"],
                                                 d["num_kv_heads"], d["head_dim"], rows * context,
                                                 np.dtype(self.dec.kv_dtype).itemsize)
        self.export = {k: d.get(k) for k in ("precision", "block_size", "accuracy_level")}
        self.b = self.dec.bucket_for(rows)

    def step(self) -> None:
        c = self.dec.cache
        for r in range(self.rows):
            c.lengths[r] = self.context  # the same position every step: the same work
        self.dec.step(self.b, [1] * self.b, [self.context] * self.rows + [None] * (self.b - self.rows),
                      [False] * self.b)

    def end_profile(self) -> str:
        return self.dec.session.end_profiling()


class GenaiStep:
    """An onnxruntime-genai package's decoder graph on a plain session: input_ids (or inputs_embeds: a phi3v
    package), attention_mask, past KV of `context` positions."""

    kind = "onnxruntime-genai package"

    def __init__(self, path: Path, rows: int, context: int, threads: int, profile: str | None = None):
        from .systems import genai_graph_facts

        cfg = json.loads((path / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        self.sess = ort.InferenceSession(str(path / dec["filename"]), session_options(threads, profile),
                                         providers=["CPUExecutionProvider"])
        self.rows, self.context = rows, context
        self.names = dec["inputs"], dec["outputs"]
        self.layers, kv, hd = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        past = self.sess.get_inputs()
        kv_type = next(i.type for i in past if i.name == self.names[0]["past_key_names"] % 0)
        kv_dtype = np.float16 if "float16" in kv_type else np.float32
        self.past = [np.zeros((rows, kv, context, hd), kv_dtype) for _ in range(2 * self.layers)]
        facts = genai_graph_facts(path)
        self.step_bytes = (facts["decoder_bytes"] - facts["embedding_bytes"]
                           + 2 * self.layers * kv * hd * rows * context * np.dtype(kv_dtype).itemsize)
        self.export = {"block_size": facts["block_size"], "accuracy_level": facts["accuracy_level"]}
        self.feeds = {"input_ids": np.ones((rows, 1), np.int64),
                      "attention_mask": np.ones((rows, context + 1), np.int64)}
        wanted = {i.name: i for i in past}
        if "position_ids" in wanted:
            self.feeds["position_ids"] = np.full((rows, 1), context, np.int64)
        if "inputs_embeds" in wanted:  # phi3v packages (ours): the embedding is a graph of its own
            dt_ = np.float16 if "float16" in wanted["inputs_embeds"].type else np.float32
            self.feeds["inputs_embeds"] = np.zeros((rows, 1, dec["hidden_size"]), dt_)
        ins, outs = self.names
        for i in range(self.layers):
            self.feeds[ins["past_key_names"] % i] = self.past[2 * i]
            self.feeds[ins["past_value_names"] % i] = self.past[2 * i + 1]
        self.feeds = {k: v for k, v in self.feeds.items() if k in wanted}
        self.out_names = [outs["logits"]] + [outs[k] % i for i in range(self.layers)
                                             for k in ("present_key_names", "present_value_names")]

    def step(self) -> None:
        b = self.sess.io_binding()
        for k, v in self.feeds.items():
            b.bind_cpu_input(k, v)
        for n in self.out_names:
            b.bind_output(n)
        self.sess.run_with_iobinding(b)

    def end_profile(self) -> str:
        return self.sess.end_profiling()


def make(path: Path, rows: int, context: int, threads: int, profile: str | None = None):
    if (path / "manifest.json").is_file():
        return BundleStep(path, rows, context, threads, profile)
    if (path / "genai_config.json").is_file():
        if rows != 1:
            return None  # onnxruntime-genai's phi3 loop decodes one sequence at a time here
        return GenaiStep(path, rows, context, threads, profile)
    raise SystemExit(f"{path}: neither a phi3v-edge bundle (manifest.json) nor an onnxruntime-genai package "
                     "(genai_config.json)")


def time_steps(g, steps: int) -> float:
    g.step()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        g.step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def op_profile(path: Path, rows: int, context: int, threads: int) -> dict[str, float]:
    """ms per operator type in one step (ORT profiler; median of 5 profiled steps per node, summed by type)."""
    with tempfile.TemporaryDirectory() as tmp:
        g = make(path, rows, context, threads, profile=str(Path(tmp) / "p"))
        for _ in range(6):
            g.step()
        events = json.loads(Path(g.end_profile()).read_text())
    per_node: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"], []).append(e["dur"] / 1e3)
            kinds[e["name"]] = e.get("args", {}).get("op_name", "?")
    by_op: dict[str, float] = {}
    for name, durs in per_node.items():
        by_op[kinds[name]] = by_op.get(kinds[name], 0.0) + statistics.median(durs[1:] or durs)
    return dict(sorted(((k, round(v, 2)) for k, v in by_op.items()), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    from phi3v_edge.runtime.threads import default_threads

    from .measure import read_bandwidth_gbps
    from .suite import device_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", metavar="NAME=DIR", help="a bundle or onnxruntime-genai package, named")
    ap.add_argument("--context", type=int, default=150, help="cached positions per row (default 150)")
    ap.add_argument("--rows", default="1", help="comma-separated batch rows (bundles; default 1)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per graph and round (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians reported (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    ap.add_argument("--profile", action="store_true", help="also ORT's per-op time of one step, by operator type")
    ap.add_argument("--note", default="", help="free text for the record")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/decode-step-<date>)")
    a = ap.parse_args(argv)
    threads = default_threads(a.threads)
    rows = [int(x) for x in a.rows.split(",")]
    specs = []
    for s in a.graphs:
        name, sep, path = s.partition("=")
        if not sep or not path:
            ap.error(f"{s!r}: expected NAME=DIR")
        if not Path(path).is_dir():
            ap.error(f"{path}: no such directory")
        specs.append((name, Path(path)))
    load_before = [round(x, 2) for x in os.getloadavg()]
    read_bw = read_bandwidth_gbps(threads)
    results = []
    for r in rows:
        graphs = [(n, p, make(p, r, a.context, threads)) for n, p in specs]
        graphs = [(n, p, g) for n, p, g in graphs if g is not None]
        times: dict[str, list[float]] = {n: [] for n, _, _ in graphs}
        for k in range(a.rounds):
            for n, _, g in graphs:
                times[n].append(time_steps(g, a.steps))
            print(f"rows {r}, round {k + 1}: " + ", ".join(f"{n} {1e3 * t[-1]:.1f} ms" for n, t in times.items()),
                  file=sys.stderr, flush=True)
        for n, p, g in graphs:
            t = statistics.median(times[n])
            gbps = g.step_bytes / t / 1e9
            results.append({"name": n, "path": str(p), "kind": g.kind, "export": g.export, "rows": r,
                            "step_ms": round(1e3 * t, 3), "per_round_ms": [round(1e3 * x, 3) for x in times[n]],
                            "tok_s": round(r / t, 2), "step_gb": round(g.step_bytes / 1e9, 3),
                            "achieved_gbps": round(gbps, 2), "pct_of_read_bw": round(100 * gbps / read_bw, 1)})
        del graphs
    profiles = {}
    if a.profile:
        for n, p in specs:
            profiles[n] = op_profile(p, rows[0], a.context, threads)
    now = dt.datetime.now(dt.timezone.utc)
    res = {"date": now.isoformat(timespec="seconds"), "device": device_name("cpu"),
           "command": "python -m phi3v_edge.benchmarks.decode_step " + " ".join(argv if argv is not None else sys.argv[1:]),
           "onnxruntime": ort.__version__, "threads": threads, "context": a.context, "steps": a.steps,
           "rounds": a.rounds, "read_bandwidth_gbps": read_bw, "load_average_before": load_before,
           "load_average_after": [round(x, 2) for x in os.getloadavg()], "note": a.note, "results": results,
           "profiles": profiles}
    stem = Path(a.out) if a.out else RESULTS / f"decode-step-{now:%Y-%m-%d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


def markdown(res: dict) -> str:
    lines = [f"# One decode step, graph against graph, {res['device']}", "", f"- date: {res['date']}",
             f"- command: `{res['command']}`",
             f"- onnxruntime {res['onnxruntime']}, {res['threads']} intra-op threads, {res['context']} cached positions "
             f"per row, median of {res['steps']} steps per round, {res['rounds']} interleaved rounds (median)",
             f"- read bandwidth: {res['read_bandwidth_gbps']} GB/s; load average before / after: "
             f"{res['load_average_before']} / {res['load_average_after']}"]
    if res.get("note"):
        lines.append(f"- note: {res['note']}")
    lines += ["", "| graph | kind | export | rows | step (ms) | per round (ms) | tokens/s | step reads (GB) "
              "| achieved GB/s | % of read bandwidth |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        exp = ", ".join(f"{k} {v}" for k, v in r["export"].items() if v is not None)
        lines.append(f"| {r['name']} | {r['kind']} | {exp} | {r['rows']} | {r['step_ms']} | "
                     f"{' / '.join(str(x) for x in r['per_round_ms'])} | {r['tok_s']} | {r['step_gb']} | "
                     f"{r['achieved_gbps']} | {r['pct_of_read_bw']} |")
    for name, ops in res.get("profiles", {}).items():
        total = sum(ops.values())
        lines += ["", f"Per-op time of one step, {name} (ORT profiler, ms by operator type; {total:.1f} ms in all):", ""]
        lines.append(", ".join(f"{k} {v}" for k, v in ops.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
