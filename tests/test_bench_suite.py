"""The GPU benchmark suite's --tiny CPU dry run: the same code path end to end, so the suite cannot rot.
No speed is asserted; every figure that is not a speed is checked against an independent source (the bundle
files on disk, the processor's token counts, the installed versions), and every speed is a measured,
positive number that the Markdown table shows as written in the JSON."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from phi3v_edge.benchmarks import suite, systems
from phi3v_edge.runtime import bundle as fmt
from phi3v_edge.runtime.processor import Phi3VProcessor


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    assert suite.main(["--tiny", "--workdir", str(tmp / "w"), "--results-dir", str(tmp / "r"),
                       "--systems", "edge,torch,torch-nf4"]) == 0
    files = sorted((tmp / "r").iterdir())
    stems = {f.name.rsplit(".", 1)[0] for f in files}
    assert len(stems) == 1 and {f.suffix for f in files} == {".json", ".md", ".png"}
    stem = stems.pop()
    assert (tmp / "r" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp / "r" / f"{stem}.json").read_text())
    return tmp / "w", res, (tmp / "r" / f"{stem}.md").read_text()


def _rows(res):
    return {(r["system"], r["precision"]): r for r in res["rows"]}


def test_bundle_figures_match_the_bundles_on_disk(dry_run):
    work, res, _ = dry_run
    rows = _rows(res)
    for precision in ("int4", "fp32"):
        r = rows[("phi3v-edge", precision)]
        assert "error" not in r, r
        bdir = work / f"bundle-{precision}-cpu"
        m = fmt.load_manifest(bdir)
        on_disk = sum((bdir / name).stat().st_size for name in m["files"])
        assert r["bundle_gb"] == round(on_disk / 1e9, 3)
        assert r["export"]["block_size"] == m["decoder"]["block_size"]
        assert r["export"]["vision_precision"] == m["vision"]["precision"]
        assert r["export"]["accuracy_level"] == m["decoder"].get("accuracy_level", 0)
    assert rows[("phi3v-edge", "int4")]["bundle_gb"] < rows[("phi3v-edge", "fp32")]["bundle_gb"]


def test_token_counts_match_the_processor(dry_run):
    work, res, _ = dry_run
    rows = _rows(res)
    proc = Phi3VProcessor.from_pretrained(work / "bundle-fp32-cpu")
    prompt, images = systems.image_prompt()
    for crops in res["settings"]["crops"]:
        want = proc(prompt, images, num_crops=crops).input_ids.shape[1]
        for key in (("phi3v-edge", "int4"), ("phi3v-edge", "fp32")):
            assert rows[key][f"prompt_tokens_crops{crops}"] == want
    for label, target in res["settings"]["contexts"].items():  # the same text prompt for every system
        got = {rows[k][f"context_{label}"] for k in (("phi3v-edge", "int4"), ("phi3v-edge", "fp32"), ("pytorch", "fp32"))}
        assert len(got) == 1 and 0 < got.pop() <= target


def test_measured_figures_are_real_and_shown(dry_run):
    _, res, md = dry_run
    rows = _rows(res)
    assert res["versions"]["onnxruntime"] == ort.__version__ and res["versions"]["torch"] == torch.__version__
    assert np.isfinite(res["copy_bandwidth_gbps"]) and res["copy_bandwidth_gbps"] > 0
    bw = res["read_bandwidth_gbps"]  # the CPU decode floor's denominator, beside achieved GB/s in every row
    assert np.isfinite(bw) and bw > 0 and res["settings"]["threads"] >= 1
    assert "pct_of_read_bw" in next(x for x in md.splitlines() if x.startswith("| system |"))
    for key in (("phi3v-edge", "int4"), ("phi3v-edge", "fp32"), ("pytorch", "fp32")):
        r = rows[key]
        assert "error" not in r, r
        for col in ("decode_tok_s_1k", "decode_tok_s_4k", "preprocess_ms", "vision_ms", "prefill_ms",
                    "ttft_ms_crops4", "ttft_ms_crops16", "achieved_gbps", "peak_rss_gib"):
            assert isinstance(r[col], float) and r[col] > 0, (key, col, r[col])
        if key[0] == "phi3v-edge":
            assert r["pct_of_read_bw"] == round(100 * r["achieved_gbps"] / bw, 1), r
        line = next(x for x in md.splitlines() if x.startswith(f"| {key[0]} | {key[1]} |"))
        assert f"{r['decode_tok_s_1k']:.4g}" in line and f"{r['ttft_ms_crops4']:.4g}" in line
    nf4 = rows[("pytorch+bnb", "nf4")]
    assert nf4["skipped"] == "bitsandbytes NF4 needs CUDA" and nf4["decode_tok_s_1k"] is None
    c = res["correctness"]
    assert c["fp32_bundle_vs_reference_logits_rel_err_text"] < 1e-4
    assert c["fp32_bundle_vs_reference_logits_rel_err_image"] < 1e-4
    assert c["fp32_bundle_vs_reference_argmax_equal_text"] is True
