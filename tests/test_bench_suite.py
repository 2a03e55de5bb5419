"""The GPU benchmark suite's --tiny CPU dry run: the same code path end to end, so the suite cannot rot.
(Only that it runs and reports consistently is checked here; no speed is asserted.)"""
from __future__ import annotations

import json

from phi3v_edge.benchmarks import suite


def test_tiny_dry_run_writes_the_table(tmp_path, capsys):
    assert suite.main(["--tiny", "--workdir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r"),
                       "--systems", "edge,torch,torch-nf4"]) == 0
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    stems = {f.rsplit(".", 1)[0] for f in files}
    assert len(stems) == 1 and {f.rsplit(".", 1)[1] for f in files} == {"json", "md", "png"}
    res = json.loads((tmp_path / "r" / f"{stems.pop()}.json").read_text())
    for key in ("date", "device", "versions", "copy_bandwidth_gbps", "rows"):
        assert key in res
    assert res["copy_bandwidth_gbps"] > 0
    rows = {(r["system"], r["precision"]): r for r in res["rows"]}
    for r in res["rows"]:
        assert set(suite.ROW_KEYS) <= set(r)
    for key in (("phi3v-edge", "int4"), ("phi3v-edge", "fp32"), ("pytorch", "fp32")):
        r = rows[key]
        assert "error" not in r, r
        assert r["decode_tok_s_1k"] > 0 and r["decode_tok_s_4k"] > 0
        assert r["ttft_ms_crops4"] > 0 and r["ttft_ms_crops16"] > 0
        assert abs(r["preprocess_ms"] + r["vision_ms"] + r["prefill_ms"] - r["ttft_ms_crops4"]) < 0.1
        assert r["achieved_gbps"] > 0
    assert rows[("phi3v-edge", "int4")]["bundle_gb"] < rows[("phi3v-edge", "fp32")]["bundle_gb"]
    assert rows[("pytorch+bnb", "nf4")]["skipped"] == "bitsandbytes NF4 needs CUDA"
    c = res["correctness"]
    assert c["fp32_bundle_vs_reference_logits_rel_err_text"] < 1e-4
    assert c["fp32_bundle_vs_reference_logits_rel_err_image"] < 1e-4
    assert "| phi3v-edge | int4 |" in capsys.readouterr().out
