"""The CPU as a target (issue 18): export defaults for --target cpu (MatMulNBits accuracy_level 4 in the
decoder, an INT8 vision encoder at accuracy_level 0), the --accuracy-level / --vision-accuracy-level options,
and the intra-op thread default."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from phi3v_edge.export import bundle as exp
from phi3v_edge.export.cli import main as export_main
from phi3v_edge.runtime import threads as th
from phi3v_edge.runtime.session import session_options


def _matmulnbits_levels(path) -> set[int]:
    m = onnx.load(str(path), load_external_data=False)
    return {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
            for n in m.graph.node if n.op_type == "MatMulNBits"}


@pytest.fixture(scope="module")
def cpu_bundles(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported to INT4 for the CPU twice: the defaults, and accuracy_level 0."""
    d = tmp_path_factory.mktemp("cpu_target")
    fast = exp.export_bundle(tiny_checkpoint, d / "default", "int4", target="cpu")
    exact = exp.export_bundle(tiny_checkpoint, d / "acc0", "int4", target="cpu", accuracy_level=0)
    return fast, exact


def test_cpu_defaults_are_recorded_and_in_the_graphs(cpu_bundles):
    fast, exact = cpu_bundles
    m = json.loads((fast / "manifest.json").read_text())
    assert m["decoder"]["accuracy_level"] == 4 and m["decoder"]["block_size"] == 64
    assert m["vision"]["precision"] == "int8" and m["vision"]["accuracy_level"] == 0
    assert m["vision"]["io_dtype"] == "float32" and m["vision"]["compute_dtype"] == "float32"
    assert m["vision"]["block_size"] == 32  # the decoder's block size where it divides the vision sizes (CLIP 32)
    assert _matmulnbits_levels(fast / "decoder.onnx") == {4}
    assert _matmulnbits_levels(fast / "vision.onnx") == {0}
    assert _matmulnbits_levels(exact / "decoder.onnx") == {0}
    assert _matmulnbits_levels(exact / "vision.onnx") == {0}


def test_accuracy_level_4_stays_close_to_level_0(cpu_bundles):
    """Same weights, int8 activations: same image features and logits up to the activation rounding."""
    from phi3v_edge.runtime import Phi3VRuntime
    from phi3v_edge.runtime.chat_template import build_prompt
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    prompt, images = build_prompt([{"role": "user", "content": "What is shown?", "images": [img]}])
    logits = []
    for b in cpu_bundles:
        rt = Phi3VRuntime(b, provider="cpu", max_length=1024)
        logits.append(rt.score(prompt, images, num_crops=1)[0].astype(np.float64).ravel())
    fast, exact = logits
    rel = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    assert 0 < rel < 0.05, rel  # not identical (the option took effect), yet close


def test_cuda_target_and_explicit_options(tiny_checkpoint, tmp_path):
    cuda = exp.export_bundle(tiny_checkpoint, tmp_path / "cuda", "int4", target="cuda")
    m = json.loads((cuda / "manifest.json").read_text())
    assert m["decoder"]["accuracy_level"] == 0 and m["vision"]["precision"] == "fp16"
    assert m["decoder"]["block_size"] == 32
    fp32 = exp.export_bundle(tiny_checkpoint, tmp_path / "fp32", "fp32", target="cpu")
    assert json.loads((fp32 / "manifest.json").read_text())["vision"]["precision"] == "fp32"
    out = tmp_path / "cli"
    assert export_main([str(tiny_checkpoint), "--out", str(out), "--target", "cpu", "--accuracy-level", "0",
                        "--vision-precision", "fp32", "--block-size", "64", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["decoder"]["accuracy_level"] == 0 and m["decoder"]["block_size"] == 64
    assert m["vision"]["precision"] == "fp32"
    # accuracy_level given alone sets both graphs; vision_accuracy_level sets the vision encoder alone
    both = exp.export_bundle(tiny_checkpoint, tmp_path / "both4", "int4", target="cpu", accuracy_level=4)
    assert _matmulnbits_levels(both / "decoder.onnx") == {4} and _matmulnbits_levels(both / "vision.onnx") == {4}
    out = tmp_path / "cli-vis4"
    assert export_main([str(tiny_checkpoint), "--out", str(out), "--target", "cpu", "--vision-accuracy-level", "4",
                        "--accuracy-level", "0", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["decoder"]["accuracy_level"] == 0 and m["vision"]["accuracy_level"] == 4
    assert _matmulnbits_levels(out / "decoder.onnx") == {0} and _matmulnbits_levels(out / "vision.onnx") == {4}
    with pytest.raises(exp.ExportError, match="vision accuracy level 1"):
        exp.export_bundle(tiny_checkpoint, tmp_path / "bad", "int4", target="cpu", vision_accuracy_level=1)
    with pytest.raises(exp.ExportError, match="accuracy level 2"):
        exp.export_bundle(tiny_checkpoint, tmp_path / "bad", "int4", target="cpu", accuracy_level=2)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        export_main([str(tiny_checkpoint), "--out", str(tmp_path / "bad2"), "--accuracy-level", "3"])


def test_default_cpu_block_falls_back_to_32_where_64_does_not_divide():
    from types import SimpleNamespace

    from phi3v_edge.export.bundle import fit_block_size

    assert fit_block_size(SimpleNamespace(hidden_size=3072, intermediate_size=8192), 64, None) == 64
    assert fit_block_size(SimpleNamespace(hidden_size=96, intermediate_size=192), 64, None) == 32
    assert fit_block_size(SimpleNamespace(hidden_size=96, intermediate_size=192), 64, 64) == 64  # asked: kept


def test_int8_vision_block_size_follows_the_vision_sizes(tiny_checkpoint, tmp_path):
    """Tiny CLIP (hidden 32): a block-64 decoder gets a block-32 int8 vision encoder, recorded as such."""
    b = exp.export_bundle(tiny_checkpoint, tmp_path / "b64", "int4", target="cpu", block_size=64)
    m = json.loads((b / "manifest.json").read_text())
    assert m["decoder"]["block_size"] == 64 and m["vision"]["block_size"] == 32


def _fake_sys(root, topology: dict[int, tuple[int, int]]):
    for cpu, (pkg, core) in topology.items():
        t = root / f"cpu{cpu}" / "topology"
        t.mkdir(parents=True)
        (t / "physical_package_id").write_text(f"{pkg}\n")
        (t / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_cores_not_hyperthreads(tmp_path):
    sys_cpu = _fake_sys(tmp_path / "a", {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0), 5: (1, 0)})
    assert th.physical_cores(sys_cpu, cpus={0, 1, 2, 3, 4, 5}) == 3
    assert th.physical_cores(sys_cpu, cpus={0, 2}) == 1  # pinned to two hyper-threads of one core
    assert th.physical_cores(tmp_path / "missing", cpus={0, 1, 2}) == 3  # no topology: every CPU counts


def test_thread_default_option_and_environment(monkeypatch):
    monkeypatch.delenv(th.THREADS_ENV, raising=False)
    assert session_options().intra_op_num_threads == th.physical_cores() >= 1
    assert session_options(3).intra_op_num_threads == 3
    monkeypatch.setenv(th.THREADS_ENV, "5")
    assert session_options().intra_op_num_threads == 5
    assert session_options(2).intra_op_num_threads == 2  # the argument wins
    for bad in ("two", "0"):
        monkeypatch.setenv(th.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=th.THREADS_ENV):
            session_options()
