"""The export driver: manifest contents, atomic writes, --force, clear errors, the CLI, verify."""
from __future__ import annotations

import json

import pytest

from phi3v_edge.export import bundle as exp
from phi3v_edge.export.cli import main as export_main
from phi3v_edge.models.testing import tiny_config
from phi3v_edge.runtime import bundle as fmt


def test_manifest_describes_the_bundle(tiny_bundle, tiny_checkpoint):
    m = fmt.load_manifest(tiny_bundle)
    assert m["format"] == fmt.FORMAT_NAME and m["format_version"] == fmt.FORMAT_VERSION
    assert m["source"]["checkpoint"] == str(tiny_checkpoint)
    assert m["decoder"]["precision"] == "fp32" and m["vision"]["precision"] == "fp32"
    cfg = tiny_config()
    assert m["decoder"]["num_layers"] == cfg.num_hidden_layers and m["decoder"]["vocab_size"] == 32064
    assert m["rope"]["short_factor"] == cfg.rope_short_factor and m["rope"]["long_factor"] == cfg.rope_long_factor
    assert m["rope"]["original_max_position_embeddings"] == cfg.original_max_position_embeddings
    assert m["tokens"]["stop_ids"] == [2, 32000, 32007] and m["tokens"]["bos"] == 1
    assert m["processor"]["num_crops"] == 4
    for name in ("decoder.onnx", "decoder.onnx.data", "vision.onnx", "tokenizer.json", "preprocessor_config.json"):
        assert name in m["files"], name
        assert m["files"][name]["bytes"] == (tiny_bundle / name).stat().st_size
        assert m["files"][name]["sha256"] == fmt.file_sha256(tiny_bundle / name)
    assert fmt.verify_bundle(tiny_bundle) == []


def test_int4_manifest_records_quantization(tiny_checkpoint, tmp_path):
    out = exp.export_bundle(tiny_checkpoint, tmp_path / "b", "int4", target="cpu", block_size=64, symmetric=False)
    d = fmt.load_manifest(out)["decoder"]
    assert (d["precision"], d["block_size"], d["symmetric"], d["io_dtype"]) == ("int4", 64, False, "float32")


def test_existing_output_needs_force_and_is_replaced_whole(tiny_checkpoint, tmp_path):
    out = tmp_path / "b"
    exp.export_bundle(tiny_checkpoint, out, "fp32", target="cpu")
    first = fmt.load_manifest(out)["created"]
    with pytest.raises(exp.ExportError, match="already exists.*--force"):
        exp.export_bundle(tiny_checkpoint, out, "fp32", target="cpu")
    (out / "stale.txt").write_text("from the old bundle")
    exp.export_bundle(tiny_checkpoint, out, "int8", target="cpu", force=True)
    assert fmt.load_manifest(out)["decoder"]["precision"] == "int8"
    assert not (out / "stale.txt").exists()
    assert first  # the old one was complete too
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary or old directories left


def test_failed_export_leaves_nothing_that_looks_like_a_bundle(tiny_checkpoint, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(exp, "build_decoder", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        exp.export_bundle(tiny_checkpoint, tmp_path / "b", "int4", target="cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(precision="int3"), "precision 'int3' is not supported"),
    (dict(precision="int4", block_size=48), "block size 48"),
    (dict(precision="int4", target="tpu"), "target 'tpu'"),
    (dict(precision="int4", vision_precision="int4"), "vision precision 'int4'"),
])
def test_bad_options_are_clear_errors(tiny_checkpoint, tmp_path, kwargs, match):
    with pytest.raises(exp.ExportError, match=match):
        exp.export_bundle(tiny_checkpoint, tmp_path / "b", **kwargs)
    assert not (tmp_path / "b").exists()


def test_missing_key_is_named_before_any_work(tmp_path):
    from phi3v_edge.models.checkpoint import save_checkpoint
    from phi3v_edge.models.testing import random_state_dict

    cfg = tiny_config(num_layers=1, vision_layers=1)
    state = random_state_dict(cfg)
    del state["model.layers.0.mlp.gate_up_proj.weight"]
    save_checkpoint(state, tmp_path / "c", config=cfg)
    with pytest.raises(exp.ExportError, match=r"missing tensor model\.layers\.0\.mlp\.gate_up_proj\.weight"):
        exp.export_bundle(tmp_path / "c", tmp_path / "b", "int4")
    assert not (tmp_path / "b").exists()


def test_cli_export_and_errors(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli-b"
    assert export_main([str(tiny_checkpoint), "--out", str(out), "--precision", "int4", "--target", "cpu", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["decoder"]["precision"] == "int4"
    assert export_main([str(tiny_checkpoint), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nowhere" / "x"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err


def test_verify_catches_a_flipped_byte(tiny_checkpoint, tmp_path):
    out = exp.export_bundle(tiny_checkpoint, tmp_path / "b", "int4", target="cpu")
    data = out / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    fmt.load_manifest(out)  # same size: the cheap load check passes
    problems = fmt.verify_bundle(out)
    assert len(problems) == 1 and problems[0].startswith("decoder.onnx.data")


def test_export_target_defaults_to_auto(tiny_checkpoint, tmp_path, capsys):
    from phi3v_edge.runtime.session import resolve_provider

    want = resolve_provider("auto")
    assert exp.resolve_target("auto") == want and exp.resolve_target("cuda") == "cuda"
    out = tmp_path / "auto"
    assert export_main([str(tiny_checkpoint), "--out", str(out), "--precision", "fp16", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert f"target {want} (auto:" in cap.err and f"target {want})" in cap.out
    # fp16 weights: float16 activations only for a cuda target (the old default was cuda on any machine)
    assert fmt.load_manifest(out)["decoder"]["io_dtype"] == ("float16" if want == "cuda" else "float32")


def test_stale_partial_directories_are_removed_running_ones_kept(tiny_checkpoint, tmp_path, caplog):
    """An export killed half-way leaves .NAME.partial-*; the next export of NAME removes it (issue 16 item 5),
    but never the directory of an export that is still running (it holds the flock of its lock file)."""
    import fcntl
    import logging
    import os
    import time

    out = tmp_path / "b"
    stale_locked = tmp_path / ".b.partial-111-dead"  # killed: its lock file is there but nobody holds it
    stale_locked.mkdir()
    (stale_locked / exp.PARTIAL_LOCK).write_text("")
    (stale_locked / "decoder.onnx.data").write_bytes(b"\0" * 1000)
    old_unlocked = tmp_path / ".b.partial-222-old"  # from an older phi3v-edge: no lock file, an hour old
    old_unlocked.mkdir()
    os.utime(old_unlocked, (time.time() - 3600, time.time() - 3600))
    running = tmp_path / ".b.partial-333-live"  # a running export: holds its lock
    running.mkdir()
    fd = os.open(running / exp.PARTIAL_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    starting = tmp_path / ".b.partial-444-new"  # just created, lock file not there yet
    starting.mkdir()
    other = tmp_path / ".c.partial-555-dead"  # another target's: not ours to judge
    other.mkdir()
    try:
        with caplog.at_level(logging.WARNING, logger="phi3v_edge"):
            exp.export_bundle(tiny_checkpoint, out, "fp32", target="cpu")
    finally:
        os.close(fd)
    assert not stale_locked.exists() and not old_unlocked.exists()
    assert running.exists() and starting.exists() and other.exists()
    assert "removed" in caplog.text and str(stale_locked) in caplog.text and str(running) in caplog.text
    assert exp.PARTIAL_LOCK not in fmt.load_manifest(out)["files"] and not (out / exp.PARTIAL_LOCK).exists()
    assert exp.remove_stale_partials(out) == [running]  # its export ended: now stale


def test_bundle_modes_follow_the_umask(tiny_checkpoint, tmp_path):
    """Bundle directories used to be 0700 (tempfile.mkdtemp): unreadable by another user (issue 16 item 6)."""
    import os
    import stat

    old = os.umask(0o022)
    for f in tiny_checkpoint.iterdir():
        if f.suffix == ".json":
            f.chmod(0o600)  # a private checkpoint: its tokenizer files keep no say over the bundle's modes
    try:
        out = exp.export_bundle(tiny_checkpoint, tmp_path / "b", "fp32", target="cpu")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in out.iterdir())  # files readable by all
    os.umask(0o077)
    try:
        out = exp.export_bundle(tiny_checkpoint, tmp_path / "private", "fp32", target="cpu")
    finally:
        os.umask(old)
        for f in tiny_checkpoint.iterdir():
            if f.suffix == ".json":
                f.chmod(0o644)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_option_checks_have_one_home(tiny_checkpoint, tmp_path):
    """The block size / precision checks of the quantizer, both graph builders and export_bundle are the same
    function (export/options.py): the same option gives the same message everywhere."""
    import numpy as np

    from phi3v_edge.export import options
    from phi3v_edge.export.decoder_graph import resolve_options
    from phi3v_edge.export.quantize import quantize
    from phi3v_edge.export.vision_graph import build_vision
    from phi3v_edge.models.checkpoint import CheckpointReader

    cfg = tiny_config()
    calls = [lambda: quantize(np.zeros((4, 96), np.float32), 4, 48),
             lambda: resolve_options(cfg, "int4", block_size=48),
             lambda: build_vision(CheckpointReader(tiny_checkpoint), cfg, tmp_path, precision="int8", block_size=48)]
    tails = set()
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        tails.add(str(e.value).split("block size ", 1)[1])
    assert tails == {"48 is not supported (use one of " + ", ".join(map(str, options.BLOCK_SIZES)) + ")"}
    with pytest.raises(exp.ExportError, match=r"vision precision 'int4' is not supported \(use one of fp32, fp16, int8\)"):
        build_vision(CheckpointReader(tiny_checkpoint), cfg, tmp_path, precision="int4")
    with pytest.raises(exp.ExportError, match=r"lm_head precision 'int2' is not supported"):
        resolve_options(cfg, "int4", lm_head_precision="int2")
