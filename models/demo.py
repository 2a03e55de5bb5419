"""`phi3v-edge demo`: the bundled small trained model, exported once to an INT4 bundle (cached), asked a
few questions about the bundled example images. Offline; CPU or CUDA.

The checkpoint (models/demo/checkpoint) has Phi-3.5-vision's exact architecture, only narrower and
shallower; see models/demo/MODEL_CARD.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"
CHECKPOINT = DEMO_DIR / "checkpoint"
EXAMPLES = DEMO_DIR / "examples"


def cache_root() -> Path:
    base = os.environ.get("PHI3V_EDGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "phi3v-edge")
    return Path(base).expanduser()


def checkpoint_digest(ckpt: Path) -> str:
    """Identifies the checkpoint's contents (config + weights), so a changed model is re-exported."""
    h = hashlib.sha256()
    for p in sorted(ckpt.iterdir()):
        if p.suffix in (".json", ".safetensors"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


EXPORT_DEFAULTS = 2  # bump when export_bundle's defaults change what a demo bundle holds


def demo_bundle(provider: str, precision: str = "int4", block_size: int | None = None, force: bool = False,
                log=print) -> Path:
    """The cached demo bundle for this provider, exported on first use (block_size None: the target's default)."""
    target = "cuda" if provider == "cuda" else "cpu"
    if block_size is None:
        from phi3v_edge.export.bundle import cpu_defaults

        block_size = cpu_defaults(precision, target, None, None)[3]
    # e{N}: the export defaults' generation (2: INT8 vision at accuracy_level 0), so a cache from older defaults
    # is not reused
    out = cache_root() / f"demo-{checkpoint_digest(CHECKPOINT)}-{precision}-b{block_size}-{target}-e{EXPORT_DEFAULTS}"
    from phi3v_edge.runtime.bundle import BundleError, load_manifest

    if out.is_dir() and not force:
        try:
            load_manifest(out)
            return out
        except BundleError as e:
            log(f"cached bundle unusable ({e}); exporting again")
    from phi3v_edge.export.bundle import export_bundle

    t0 = time.perf_counter()
    log(f"exporting the demo model to {precision} ({target}) -> {out} ...")
    export_bundle(CHECKPOINT, out, precision, target=target, block_size=block_size, force=True)
    log(f"exported in {time.perf_counter() - t0:.1f} s (cached for the next run)")
    return out


def load_questions() -> list[dict]:
    qs = json.loads((EXAMPLES / "questions.json").read_text())
    for q in qs:
        q["images"] = [str(EXAMPLES / im) for im in q.get("images", [])]
    return qs


def pick_provider(requested: str) -> str:
    """The runtime's one rule (runtime.session.resolve_provider): auto -> cuda when usable, else cpu."""
    from phi3v_edge.runtime.session import resolve_provider

    return resolve_provider(requested)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="phi3v-edge demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", default="auto", choices=("auto", "cuda", "cpu"),
                   help="execution provider (default auto: cuda when onnxruntime's CUDA provider is usable, else cpu)")
    p.add_argument("--precision", default="int4", choices=("fp32", "fp16", "int8", "int4"))
    p.add_argument("--re-export", action="store_true", help="ignore the cached bundle")
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args(argv)
    if not (CHECKPOINT / "config.json").is_file():
        print(f"error: the demo checkpoint is missing from {CHECKPOINT}", file=sys.stderr)
        return 2
    from phi3v_edge.runtime import Phi3VRuntime
    from phi3v_edge.runtime.chat_template import build_prompt

    provider = pick_provider(a.provider)
    bundle = demo_bundle(provider, a.precision, force=a.re_export)
    t0 = time.perf_counter()
    rt = Phi3VRuntime(bundle, provider=provider, max_length=2048)
    print(f"loaded {bundle.name} on {provider} in {time.perf_counter() - t0:.2f} s\n")
    right = 0
    qs = load_questions()
    for q in qs:
        msgs = [{"role": "user", "content": q["question"], "images": q["images"]}]
        prompt, images = build_prompt(msgs)
        res = rt.generate(prompt, images=images, max_new_tokens=a.max_new_tokens)
        answer = res.text.strip()
        ok = answer == q.get("answer")
        right += ok
        t = res.timings
        names = ", ".join(Path(i).name for i in q["images"])
        print(f"[{names}] {q['question']}\n  -> {answer}" + (f"   (expected {q['answer']})" if "answer" in q and not ok else ""))
        print("     " + "  ".join(f"{k} {1000 * v:.0f} ms" for k, v in t.items() if k in ("preprocess", "vision", "prefill", "decode")))
    print(f"\n{right}/{len(qs)} answers as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
