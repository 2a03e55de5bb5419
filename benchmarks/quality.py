"""Quantization quality on the trained demo model's held-out set: PyTorch reference vs bundles.

    python -m phi3v_edge.benchmarks.quality [--n 200] [--workdir /tmp/p3v-quality] [--checkpoint DIR]

For the PyTorch reference and each bundle variant (fp32, fp16, INT8, INT4 at block 32/128, symmetric
and asymmetric; the CPU speed options: MatMulNBits accuracy_level 4, an INT8 vision encoder, and the
`--target cpu` defaults; CPU provider): exact-answer accuracy, agreement of the greedy tokens with the fp32
reference's, and the mean KL divergence KL(reference || variant) of the next-token distributions along
the reference's answer (teacher-forced). Writes benchmarks/results/quality-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
_A0 = dict(accuracy_level=0, vision_precision="fp32")  # the CPU export before the fast defaults (issue 18)
VARIANTS = {  # name -> export options (target cpu)
    "fp32": dict(precision="fp32"),
    "fp16": dict(precision="fp16"),
    "int8-b32": dict(precision="int8", block_size=32, **_A0),
    "int4-b32-sym": dict(precision="int4", block_size=32, **_A0),
    "int4-b32-asym": dict(precision="int4", block_size=32, symmetric=False, **_A0),
    "int4-b128-sym": dict(precision="int4", block_size=128, **_A0),
    "int4-b128-asym": dict(precision="int4", block_size=128, symmetric=False, **_A0),
    # CPU speed options, one at a time, then together (the --target cpu defaults)
    "int4-b32-acc4": dict(precision="int4", block_size=32, accuracy_level=4, vision_precision="fp32"),
    "int4-b32-vis8": dict(precision="int4", block_size=32, accuracy_level=0, vision_precision="int8"),
    "int4-b32-acc4-vis8": dict(precision="int4", block_size=32, accuracy_level=4, vision_precision="int8"),
    "int4-cpu-default": dict(precision="int4"),
    "int8-b32-acc4-vis8": dict(precision="int8", block_size=32, accuracy_level=4, vision_precision="int8"),
    "int4-b64-acc4-vis8": dict(precision="int4", block_size=64, accuracy_level=4, vision_precision="int8"),
    "int4-b128-acc4-vis8": dict(precision="int4", block_size=128, accuracy_level=4, vision_precision="int8"),
    # the vision encoder at accuracy_level 0 (the CPU default since 2026-12-02: faster on AVX2), decoder at 4
    "int4-b64-acc4-vis8-va0": dict(precision="int4", block_size=64, accuracy_level=4, vision_precision="int8",
                                   vision_accuracy_level=0),
    "int4-b32-acc4-vis8-lm8": dict(precision="int4", block_size=32, accuracy_level=4, vision_precision="int8",
                                   lm_head_precision="int8"),
    "int4-b32-acc4-vis8-emb8": dict(precision="int4", block_size=32, accuracy_level=4, vision_precision="int8",
                                    embedding_precision="int8"),
}
MAX_NEW = 8


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def answer_text(tokenizer, ids: list[int], stops) -> str:
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut]).strip()


def reference_pass(ckpt: Path, examples: list[dict], prompt_fn) -> list[dict]:
    """Greedy answers of the PyTorch fp32 reference and its log-probs along them."""
    import torch

    from phi3v_edge.models.modeling import Phi3VForCausalLM
    from phi3v_edge.runtime.processor import Phi3VProcessor

    model = Phi3VForCausalLM.from_pretrained(ckpt)
    proc = Phi3VProcessor.from_pretrained(ckpt)
    stops = set(model.config.stop_ids)
    out = []
    with torch.no_grad():
        for ex in examples:
            p = proc(prompt_fn(ex), images=ex["images"])
            ids = torch.from_numpy(p.input_ids)
            pv, sizes = torch.from_numpy(p.pixel_values), torch.from_numpy(p.image_sizes)
            toks = model.generate(ids, pv, sizes, max_new_tokens=MAX_NEW)
            full = torch.cat([ids, torch.tensor([toks[:-1]], dtype=torch.long)], dim=1) if len(toks) > 1 else ids
            logits = model(input_ids=full, pixel_values=pv, image_sizes=sizes).logits[0, ids.shape[1] - 1:].numpy()
            out.append({"tokens": toks, "answer": answer_text(proc.tokenizer, toks, stops),
                        "logp": log_softmax(logits)})
    return out


def bundle_pass(bundle: Path, examples: list[dict], ref: list[dict], prompt_fn) -> list[dict]:
    from phi3v_edge.runtime import Phi3VRuntime

    rt = Phi3VRuntime(bundle, provider="cpu", max_length=2048)
    stops = set(rt.default_stop_ids)
    out = []
    for ex, r in zip(examples, ref):
        prompt = prompt_fn(ex)
        res = rt.generate(prompt, images=ex["images"], max_new_tokens=MAX_NEW)
        rows = rt.score(prompt, images=ex["images"], continuation=r["tokens"][:-1])
        lq = log_softmax(rows)
        kl = float((np.exp(r["logp"]) * (r["logp"] - lq)).sum(-1).mean())
        out.append({"tokens": res.token_ids, "answer": answer_text(rt.tokenizer, res.token_ids, stops), "kl": kl})
    return out


def summarize(name: str, runs: list[dict], examples: list[dict], ref: list[dict], extra: dict) -> dict:
    n = len(examples)
    row = {"variant": name,
           "accuracy": sum(r["answer"] == ex["answer"] for r, ex in zip(runs, examples)) / n,
           "token_agreement": sum(r["tokens"] == f["tokens"] for r, f in zip(runs, ref)) / n,
           "mean_kl": float(np.mean([r["kl"] for r in runs])) if "kl" in runs[0] else 0.0}
    row.update(extra)
    return row


def markdown(res: dict) -> str:
    lines = [f"# Quantization quality on the demo model's held-out set ({res['n']} examples)", "",
             f"- date: {res['date']}", f"- device: {res['device']}", f"- command: `{res['command']}`",
             f"- checkpoint: {res['checkpoint']}", "",
             "| variant | exact-answer accuracy | greedy tokens = fp32 reference | mean KL vs reference | bundle MB |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        mb = "–" if r.get("bundle_mb") is None else f"{r['bundle_mb']:.1f}"
        lines.append(f"| {r['variant']} | {100 * r['accuracy']:.1f}% | {100 * r['token_agreement']:.1f}% | "
                     f"{r['mean_kl']:.2e} | {mb} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="held-out examples (default 200)")
    ap.add_argument("--workdir", default="/tmp/p3v-quality", help="where the bundles are exported")
    ap.add_argument("--checkpoint", default=None, help="default: the bundled demo checkpoint")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--name", default="quality", help="results file stem: NAME-<date>.{json,md} (default quality)")
    a = ap.parse_args(argv)
    from phi3v_edge.export.bundle import export_bundle
    from phi3v_edge.models import demo_data
    from phi3v_edge.models.demo import CHECKPOINT

    from .export_bench import cpu_name

    ckpt = Path(a.checkpoint) if a.checkpoint else CHECKPOINT
    examples = demo_data.dataset("heldout", a.n)
    t0 = time.perf_counter()
    ref = reference_pass(ckpt, examples, demo_data.prompt)
    rows = [summarize("pytorch-fp32 (reference)", [dict(r, kl=0.0) for r in ref], examples, ref,
                      {"seconds": round(time.perf_counter() - t0, 1), "bundle_mb": None})]
    print(f"| reference | {100 * rows[0]['accuracy']:.1f}% |", flush=True)
    work = Path(a.workdir)
    for name in a.variants.split(","):
        opts = VARIANTS[name]
        out = work / name
        export_bundle(ckpt, out, target="cpu", force=True, **opts)
        t0 = time.perf_counter()
        runs = bundle_pass(out, examples, ref, demo_data.prompt)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and "onnx" in p.name) / 1e6
        m = json.loads((out / "manifest.json").read_text())
        resolved = {"accuracy_level": m["decoder"].get("accuracy_level"), "vision_precision": m["vision"]["precision"],
                    "block_size": m["decoder"].get("block_size")}
        rows.append(summarize(name, runs, examples, ref, {"seconds": round(time.perf_counter() - t0, 1),
                                                          "bundle_mb": round(size, 2), **resolved, **opts}))
        print(f"| {name} | {100 * rows[-1]['accuracy']:.1f}% | {100 * rows[-1]['token_agreement']:.1f}% | "
              f"{rows[-1]['mean_kl']:.2e} |", flush=True)
    now = dt.datetime.now(dt.timezone.utc)
    res = {"date": now.isoformat(timespec="seconds"), "device": f"{cpu_name()}, onnxruntime CPU provider",
           "command": "python -m phi3v_edge.benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
           "checkpoint": str(ckpt), "n": a.n, "max_new_tokens": MAX_NEW, "rows": rows}
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{a.name}-{now:%Y-%m-%d}"
    (results / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
