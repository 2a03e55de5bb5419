"""What a host gets through onnxruntime-genai's own phi3v processor compared with phi3v-edge's processor.

    python -m phi3v_edge.benchmarks.genai_processor [--n 200] [--workdir /tmp/p3v-genai]

Exports the demo checkpoint to an onnxruntime-genai package (INT4, --target cpu defaults), then on the demo
model's held-out set:
  - inputs: crops per image, BOS ids in input_ids (ours: one before every text chunk), image token counts,
    and the largest pixel difference of onnxruntime-genai's pixel_values from ours at the same crop count;
  - accuracy (exact answer, greedy, 8 new tokens) through each path: (a) onnxruntime-genai fed our processor's
    input_ids / pixel_values / image_sizes as named tensors, (b) the same at onnxruntime-genai's crop count,
    (c) onnxruntime-genai's processor end to end (og.Images + model.create_multimodal_processor()).
Writes benchmarks/results/genai-processor-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MAX_NEW = 8


def png_bytes(im) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="held-out examples (default 200)")
    ap.add_argument("--workdir", default="/tmp/p3v-genai", help="where the package is exported")
    ap.add_argument("--results-dir", default=str(RESULTS))
    a = ap.parse_args(argv)
    import onnxruntime_genai as og
    from phi3v_edge.export.genai import export_genai
    from phi3v_edge.export.genai_host import greedy, named_tensors
    from phi3v_edge.models import demo_data
    from phi3v_edge.models.demo import CHECKPOINT
    from phi3v_edge.runtime.processor import Phi3VProcessor

    from .export_bench import cpu_name
    from .quality import answer_text

    pkg = export_genai(CHECKPOINT, Path(a.workdir) / "demo-int4-cpu", "int4", target="cpu", force=True)
    model = og.Model(str(pkg))
    oga_proc = model.create_multimodal_processor()
    ours = Phi3VProcessor.from_pretrained(pkg)
    stops = {2, 32000, 32007}
    examples = demo_data.dataset("heldout", a.n)
    stats = {"our_crops": set(), "genai_crops": set(), "our_bos_per_prompt": set(), "genai_bos_per_prompt": set(),
             "max_pixel_diff_same_crops": 0.0, "image_tokens_equal": 0, "text_ids_equal_without_bos": 0}
    right = {"ours_named_tensors": 0, "ours_at_genai_crops": 0, "genai_processor": 0}
    t0 = time.perf_counter()
    for ex in examples:
        prompt = demo_data.prompt(ex)
        po = ours(prompt, ex["images"])
        gi = oga_proc(prompt, images=og.Images.open_bytes(*[png_bytes(im) for im in ex["images"]]))
        g_ids = gi["input_ids"].as_numpy().reshape(-1).astype(np.int64)
        g_pv = gi["pixel_values"].as_numpy()
        stats["our_crops"].add(po.pixel_values.shape[1] - 1)
        stats["genai_crops"].add(g_pv.shape[1] - 1)
        stats["our_bos_per_prompt"].add(int((po.input_ids == 1).sum()))
        stats["genai_bos_per_prompt"].add(int((g_ids == 1).sum()))
        same = ours(prompt, ex["images"], num_crops=g_pv.shape[1] - 1)  # ours at onnxruntime-genai's crop count
        if same.pixel_values.shape == g_pv.shape:
            d = float(np.abs(same.pixel_values - g_pv).max())
            stats["max_pixel_diff_same_crops"] = max(stats["max_pixel_diff_same_crops"], d)
            stats["image_tokens_equal"] += int(list(same.num_img_tokens) == gi["num_image_tokens"].as_numpy().reshape(-1).tolist())
        mine = same.input_ids.reshape(-1)
        stats["text_ids_equal_without_bos"] += int(np.array_equal(mine[mine != 1], g_ids[g_ids != 1]))
        for path, (inputs, length) in {"ours_named_tensors": (named_tensors(og, po), po.input_ids.shape[1]),
                                       "ours_at_genai_crops": (named_tensors(og, same), same.input_ids.shape[1]),
                                       "genai_processor": (gi, g_ids.shape[0])}.items():
            toks = greedy(og, model, inputs, length, MAX_NEW)
            right[path] += answer_text(ours.tokenizer, toks, stops) == ex["answer"]
    n = len(examples)
    res = {"date": dt.date.today().isoformat(), "device": cpu_name(), "n": n,
           "command": "python -m phi3v_edge.benchmarks.genai_processor " + " ".join(sys.argv[1:] if argv is None else argv),
           "onnxruntime_genai": og.__version__, "package": "demo checkpoint, export_genai int4 --target cpu",
           "seconds": round(time.perf_counter() - t0, 1),
           "accuracy": {k: v / n for k, v in right.items()},
           "inputs": {k: sorted(v) if isinstance(v, set) else v for k, v in stats.items()}}
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"genai-processor-{res['date']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    s = res["inputs"]
    md = [f"# onnxruntime-genai's phi3v processor vs phi3v-edge's ({n} held-out demo examples)", "",
          f"- date: {res['date']}", f"- device: {res['device']}", f"- command: `{res['command']}`",
          f"- onnxruntime-genai {res['onnxruntime_genai']}; {res['package']}", "",
          "| | phi3v-edge processor (named tensors) | onnxruntime-genai processor |", "|---|---|---|",
          f"| crops per image | {s['our_crops']} | {s['genai_crops']} |",
          f"| BOS ids per prompt | {s['our_bos_per_prompt']} | {s['genai_bos_per_prompt']} |",
          (f"| exact-answer accuracy | {100 * res['accuracy']['ours_named_tensors']:.1f}% | "
           f"{100 * res['accuracy']['genai_processor']:.1f}% |"), "",
          (f"Our processor at onnxruntime-genai's crop count (with BOS): "
           f"{100 * res['accuracy']['ours_at_genai_crops']:.1f}% (the part of the drop due to the crop count)."), "",
          (f"At onnxruntime-genai's crop count, ours gives pixel values within {s['max_pixel_diff_same_crops']:.3g} "
           f"(max abs) of its; the same image token counts in {s['image_tokens_equal']}/{n} prompts; the same "
           f"ids apart from BOS in {s['text_ids_equal_without_bos']}/{n}.")]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
