"""benchmarks/decode_step.py on the tiny bundle and the tiny genai package of the same checkpoint: every graph
gets a measured step; the bytes a step reads are checked against the files on disk, tokens/s against the step
time, the per-op profile against the graph's own operators. No speed is asserted."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from phi3v_edge.benchmarks import decode_step
from phi3v_edge.runtime import bundle as fmt


def test_bundle_and_package_steps(tiny_bundle, tiny_package, tmp_path):
    stem = tmp_path / "ds"
    assert decode_step.main([f"edge={tiny_bundle}", f"pkg={tiny_package}", "--rows", "1,2", "--context", "20",
                             "--steps", "2", "--rounds", "2", "--threads", "1", "--profile", "--out", str(stem)]) == 0
    res = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    got = {(r["name"], r["rows"]): r for r in res["results"]}
    assert set(got) == {("edge", 1), ("edge", 2), ("pkg", 1)}  # genai packages: one row only
    m = fmt.load_manifest(tiny_bundle)
    d = m["decoder"]
    emb = d["vocab_size"] * d["hidden_size"] * {"fp32": 4, "fp16": 2, "int8": 1}[d["embedding_precision"]]
    weights = sum((tiny_bundle / f).stat().st_size for f in m["files"] if f.startswith("decoder")) - emb
    for rows in (1, 2):
        r = got[("edge", rows)]
        kv = 2 * d["num_layers"] * d["num_kv_heads"] * d["head_dim"] * rows * 20 * 4
        assert r["step_gb"] == round((weights + kv) / 1e9, 3)
    for r in res["results"]:
        assert r["step_ms"] > 0 and len(r["per_round_ms"]) == 2 and r["step_ms"] == pytest.approx(
            float(np.median(r["per_round_ms"])), abs=0.01)
        assert r["tok_s"] == pytest.approx(r["rows"] * 1e3 / r["step_ms"], rel=0.01)
        assert r["pct_of_read_bw"] == pytest.approx(100 * r["achieved_gbps"] / res["read_bandwidth_gbps"], abs=0.1)
        assert f"| {r['name']} |" in md and f"| {r['step_ms']} |" in md
    ops = {n.op_type for n in onnx.load(str(tiny_bundle / fmt.DECODER_FILE), load_external_data=False).graph.node}
    prof = res["profiles"]["edge"]
    assert "GroupQueryAttention" in prof and all(v >= 0 for v in prof.values())
    assert set(prof) - {"QuickGelu", "FusedMatMul", "MatMul", "Gemm"} <= ops  # ORT fuses some ops when it loads


def test_bad_arguments_are_clear_errors(tiny_bundle, tmp_path, capsys):
    with pytest.raises(SystemExit):
        decode_step.main([str(tiny_bundle)])  # no NAME=
    assert "expected NAME=DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decode_step.main([f"x={tmp_path / 'missing'}"])
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="neither a phi3v-edge bundle"):
        decode_step.main([f"x={tmp_path}", "--steps", "1", "--rounds", "1", "--out", str(tmp_path / "o")])
