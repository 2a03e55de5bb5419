"""The `phi3v-edge` console script: generate (streamed and --json), chat, verify, dispatch, error exits."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from phi3v_edge.runtime import Phi3VRuntime
from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.cli import main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli_images") / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (240, 400, 3), dtype=np.uint8)).save(p)
    return str(p)


@pytest.fixture(scope="module")
def expected(tiny_bundle, image_path):
    """What the API gives for the same requests."""
    rt = Phi3VRuntime(tiny_bundle, provider="cpu", max_length=4096)
    p_text, _ = build_prompt([{"role": "user", "content": "Hello there"}])
    p_img, imgs = build_prompt([{"role": "user", "content": "What is this?", "images": [image_path]}])
    return {"text": rt.generate(p_text, max_new_tokens=12, stop_ids=()),
            "image": rt.generate(p_img, imgs, max_new_tokens=12, stop_ids=())}


def run(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_json(tiny_bundle, expected, image_path, capsys):
    rc, out, err = run(["generate", str(tiny_bundle), "--prompt", "Hello there", "--max-new-tokens", "12",
                        "--provider", "cpu", "--ignore-eos", "--json"], capsys)
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["token_ids"] == expected["text"].token_ids and len(obj["token_ids"]) == 12
    assert obj["text"] == expected["text"].text and obj["finish_reason"] == "length"
    assert {"preprocess", "vision", "prefill", "decode", "tokens_per_s"} <= set(obj["timings"])
    rc, out, err = run(["generate", str(tiny_bundle), "--prompt", "What is this?", "--image", image_path,
                        "--max-new-tokens", "12", "--provider", "cpu", "--ignore-eos", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["token_ids"] == expected["image"].token_ids


def test_generate_streams_text(tiny_bundle, expected, capsys):
    rc, out, err = run(["generate", str(tiny_bundle), "--prompt", "Hello there", "--max-new-tokens", "12",
                        "--ignore-eos", "--greedy"], capsys)
    assert rc == 0, err
    assert out == expected["text"].text + "\n"
    assert "12 tokens" in err and "tokens/s" in err


def test_generate_sampling_is_seeded(tiny_bundle, capsys):
    argv = ["generate", str(tiny_bundle), "--prompt", "Hi", "--max-new-tokens", "10", "--ignore-eos", "--json",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "5"]
    outs = [json.loads(run(argv, capsys)[1])["token_ids"] for _ in range(2)]
    assert outs[0] == outs[1] and len(outs[0]) == 10


@pytest.mark.parametrize("argv_tail, words", [
    (["--image", "/nonexistent/x.png"], "cannot read image"),
    (["--max-length", "16", "--max-new-tokens", "50"], "exceeds max_length 16"),
    (["--provider", "cuda"], "CUDAExecutionProvider"),
    (["--greedy", "--temperature", "0.5"], "--greedy cannot be combined"),
    (["--num-crops", "40", "--image", "IMG"], "num_crops"),
    (["--top-p", "2"], "top_p"),
])
def test_generate_errors_exit_2(tiny_bundle, image_path, capsys, argv_tail, words):
    import onnxruntime as ort

    if "--provider" in argv_tail and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    argv_tail = [image_path if a == "IMG" else a for a in argv_tail]
    rc, out, err = run(["generate", str(tiny_bundle), "--prompt", "Hello"] + argv_tail, capsys)
    assert rc == 2
    assert err.startswith("error: ") and words in err and "Traceback" not in err


def test_bad_bundle_and_usage_exit_2(tmp_path, capsys):
    rc, _, err = run(["generate", str(tmp_path / "nope"), "--prompt", "x", "--provider", "cpu"], capsys)
    assert rc == 2 and err.startswith("error: ") and "does not exist" in err
    rc, _, err = run(["generate", str(tmp_path), "--prompt", "x", "--provider", "cpu"], capsys)
    assert rc == 2 and "no manifest.json" in err
    rc, _, err = run(["generate"], capsys)  # argparse: missing arguments
    assert rc == 2 and "error:" in err
    rc, _, err = run(["frobnicate"], capsys)
    assert rc == 2


def test_help_lists_every_subcommand(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for cmd in ("generate", "chat", "verify", "export", "demo", "bench"):
        assert cmd in out


def test_export_is_dispatched(capsys):
    rc, out, err = run(["export", "--help"], capsys)
    assert rc == 0 and "phi3v-edge export" in out and "--precision" in out


def test_dispatch_failure_is_an_error(monkeypatch, capsys):
    from phi3v_edge.runtime import cli

    monkeypatch.setitem(cli.DISPATCH, "bench", ("phi3v_edge.no_such_module", "x"))
    rc, _, err = run(["bench"], capsys)
    assert rc == 2 and err.startswith("error: ") and "phi3v-edge bench" in err


def test_verify(tiny_bundle, tmp_path, capsys):
    rc, out, err = run(["verify", str(tiny_bundle)], capsys)
    assert rc == 0 and "all sha256 match" in out
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    data = bytearray((b / "tokenizer.json").read_bytes())
    data[100] ^= 0xFF
    (b / "tokenizer.json").write_bytes(bytes(data))
    rc, out, err = run(["verify", str(b), "--quiet"], capsys)
    assert rc == 1 and "tokenizer.json" in err
    (b / "manifest.json").write_text("{not json")
    rc, out, err = run(["verify", str(b)], capsys)
    assert rc == 2 and "not valid JSON" in err


def test_chat_session(tiny_bundle, image_path, monkeypatch, capsys):
    script = "\n".join([
        "Hello there",
        "/image /nonexistent.png",  # an error, the session goes on
        f"/image {image_path}",
        "What is this?",
        "/bogus",
        "/reset",
        "Hello there",
        "/quit",
        "never read",
    ]) + "\n"
    rc, out, err = run(["chat", str(tiny_bundle), "--max-new-tokens", "6", "--ignore-eos", "--provider", "cpu"],
                       capsys, stdin=script, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert "cannot read image" in err and "unknown command /bogus" in err and "conversation reset" in err
    # the turns equal the API's chat with the same history; /reset: the first turn again gives the same reply
    rt = Phi3VRuntime(tiny_bundle, provider="cpu", max_length=4096)
    t1 = [{"role": "user", "content": "Hello there"}]
    r1 = rt.chat(t1, max_new_tokens=6, stop_ids=())
    r2 = rt.chat(t1 + [{"role": "assistant", "content": r1.text},
                       {"role": "user", "content": "What is this?", "images": [image_path]}],
                 max_new_tokens=6, stop_ids=())
    assert out == f"{r1.text}\n{r2.text}\n{r1.text}\n"


def test_chat_turn_errors_keep_the_session(tiny_bundle, monkeypatch, capsys):
    script = "word " * 80 + "\nHello there\n"  # first turn too long for --max-length 64
    rc, out, err = run(["chat", str(tiny_bundle), "--max-new-tokens", "4", "--ignore-eos", "--provider", "cpu",
                        "--max-length", "64"], capsys, stdin=script, monkeypatch=monkeypatch)
    assert rc == 0 and "exceeds max_length 64" in err
    r = Phi3VRuntime(tiny_bundle, provider="cpu", max_length=64).chat([{"role": "user", "content": "Hello there"}],
                                                                      max_new_tokens=4, stop_ids=())
    assert out == r.text + "\n"


def test_console_script_subprocess(tiny_bundle, expected):
    exe = shutil.which("phi3v-edge")
    cmd = [exe] if exe else [sys.executable, "-m", "phi3v_edge.runtime.cli"]
    p = subprocess.run(cmd + ["generate", str(tiny_bundle), "--prompt", "Hello there", "--max-new-tokens", "12",
                              "--ignore-eos", "--json", "--provider", "cpu"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["token_ids"] == expected["text"].token_ids
    p = subprocess.run(cmd + ["generate", "/nonexistent-bundle", "--prompt", "x", "--provider", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_generate_reports_the_provider_auto_picked(tiny_bundle, capsys):
    from phi3v_edge.runtime.session import resolve_provider

    rc, out, err = run(["generate", str(tiny_bundle), "--prompt", "Hi", "--max-new-tokens", "2", "--ignore-eos",
                        "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["provider"] == resolve_provider("auto")


def test_stats_line_has_no_rate_from_too_few_steps(tiny_bundle, capsys):
    from phi3v_edge.runtime.cli import MIN_RATE_STEPS, decode_rate

    assert decode_rate({"decode_steps": 1, "tokens_per_s": 736.5}) == f"n/a (<{MIN_RATE_STEPS} steps)"
    assert decode_rate({"decode_steps": MIN_RATE_STEPS, "tokens_per_s": 12.345}) == "12.3 tokens/s"
    rc, out, err = run(["generate", str(tiny_bundle), "--prompt", "Hi", "--max-new-tokens", "2", "--ignore-eos",
                        "--provider", "cpu"], capsys)
    assert rc == 0, err
    assert "2 tokens" in err and f"n/a (<{MIN_RATE_STEPS} steps)" in err and "tokens/s" not in err
    assert "provider cpu" in err


def test_chat_failed_attach_leaves_the_conversation_as_it_was(tiny_bundle, image_path, tmp_path, monkeypatch,
                                                              capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    script = "\n".join([f"/image {corrupt}", "Hello there", f"/image {image_path}", "What is this?"]) + "\n"
    rc, out, err = run(["chat", str(tiny_bundle), "--max-new-tokens", "6", "--ignore-eos", "--provider", "cpu"],
                       capsys, stdin=script, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert "cannot read image" in err and "the image was not added" in err
    assert err.count("error:") == 1  # the later turns work (they used to fail with the same error each time)
    rt = Phi3VRuntime(tiny_bundle, provider="cpu", max_length=4096)
    t1 = [{"role": "user", "content": "Hello there"}]
    r1 = rt.chat(t1, max_new_tokens=6, stop_ids=())
    r2 = rt.chat(t1 + [{"role": "assistant", "content": r1.text},
                       {"role": "user", "content": "What is this?", "images": [image_path]}],
                 max_new_tokens=6, stop_ids=())
    assert out == f"{r1.text}\n{r2.text}\n"


def test_generate_with_a_placeholder_in_the_prompt(tiny_bundle, expected, image_path, capsys):
    """--prompt "<|image_1|> ..." used to fail with "prompt has 2 image placeholders but 1 image was given"."""
    rc, out, err = run(["generate", str(tiny_bundle), "--prompt", "<|image_1|>\nWhat is this?", "--image", image_path,
                        "--max-new-tokens", "12", "--provider", "cpu", "--ignore-eos", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["token_ids"] == expected["image"].token_ids  # same prompt as the added placeholder
    rc, out, err = run(["generate", str(tiny_bundle), "--prompt", "<|image_2|> What is this?", "--image", image_path,
                        "--provider", "cpu"], capsys)
    assert rc == 2 and "write <|image_1|>" in err and "Traceback" not in err
