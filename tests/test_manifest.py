"""manifest.json schema checks at load (issue 16 items 3, 4): each broken field is named with the file, from the API,
from `generate` and from `verify`, instead of a raw KeyError."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from phi3v_edge.runtime import bundle as fmt
from phi3v_edge.runtime.cli import main


@pytest.fixture
def broken(tiny_bundle, tmp_path):
    """A copy of the tiny bundle whose manifest the test edits (files are hard-linked: no copy of the weights)."""
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b, copy_function=lambda s, d: shutil.copy2(s, d) if s.endswith(".json") else
                    os.link(s, d))

    def edit(change):
        m = json.loads((b / fmt.MANIFEST).read_text())
        change(m)
        (b / fmt.MANIFEST).write_text(json.dumps(m))
        return b
    return edit


def _drop(path):
    def change(m):
        *head, last = path
        for k in head:
            m = m[k]
        del m[last]
    return change


def _set(path, value):
    def change(m):
        *head, last = path
        for k in head:
            m = m[k]
        m[last] = value
    return change


@pytest.mark.parametrize("change, words", [
    (_drop(["files", "tokenizer.json", "bytes"]), r"field 'files\.tokenizer\.json\.bytes' is missing"),
    (_drop(["files", "decoder.onnx", "sha256"]), r"field 'files\.decoder\.onnx\.sha256' is missing"),
    (_set(["files", "tokenizer.json", "bytes"], "12"), r"'files\.tokenizer\.json\.bytes' must be an integer, got str"),
    (_set(["files", "tokenizer.json", "sha256"], "abc"), r"'files\.tokenizer\.json\.sha256' must be 64"),
    (_set(["files", "vision.onnx"], 5), r"field 'files\.vision\.onnx' must be an object"),
    (_drop(["files"]), r"field 'files' is missing"),
    (_drop(["rope", "original_max_position_embeddings"]), r"'rope\.original_max_position_embeddings' is missing"),
    (_set(["rope", "theta"], "10000"), r"'rope\.theta' must be a number"),
    (_set(["rope", "short_factor"], [1.0, "x"]), r"'rope\.short_factor' must be a non-empty list of numbers"),
    (_set(["rope", "attention_factor"], 2.0), r"'rope\.attention_factor' is 2\.0"),
    (_set(["tokens", "stop_ids"], [2, "x"]), r"'tokens\.stop_ids' must be a list of token ids"),
    (_set(["processor", "crop_size"], 448), r"'processor\.crop_size' is 448"),
    (_set(["vision", "tokens_per_crop"], 256), r"'vision\.tokens_per_crop' is 256"),
    (_set(["processor", "num_img_tokens"], "144"), r"'processor\.num_img_tokens' must be an integer"),
    (_set(["decoder", "all_logits"], "no"), r"'decoder\.all_logits' must be true or false"),
    (_drop(["decoder"]), r"field 'decoder' is missing"),
])
def test_schema_errors_name_the_field_and_the_file(broken, change, words, capsys):
    b = broken(change)
    with pytest.raises(fmt.BundleError, match=words) as e:
        fmt.load_manifest(b)
    assert str(b / fmt.MANIFEST) in str(e.value)
    for argv in (["verify", str(b)], ["generate", str(b), "--prompt", "Hi", "--provider", "cpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "KeyError" not in err and str(b / fmt.MANIFEST) in err


def test_api_reports_the_field(broken):
    from phi3v_edge.runtime import Phi3VRuntime

    b = broken(_drop(["files", "tokenizer.json", "bytes"]))
    with pytest.raises(fmt.BundleError, match=r"files\.tokenizer\.json\.bytes"):
        Phi3VRuntime(b, provider="cpu")


@pytest.mark.parametrize("value, words", [
    ("1", r"'format_version' must be an integer, got str '1'"),
    (1.0, r"'format_version' must be an integer, got float 1\.0"),
    (True, r"'format_version' must be an integer, got bool True"),
    (None, r"'format_version' must be an integer, got NoneType None"),
])
def test_format_version_of_the_wrong_type(broken, value, words):
    b = broken(_set(["format_version"], value))
    with pytest.raises(fmt.BundleError, match=words):
        fmt.load_manifest(b)
    b = broken(_set(["format_version"], fmt.FORMAT_VERSION + 1))
    with pytest.raises(fmt.BundleError, match=f"has format version {fmt.FORMAT_VERSION + 1}; this phi3v-edge reads"):
        fmt.load_manifest(b)
    b = broken(_drop(["format_version"]))
    with pytest.raises(fmt.BundleError, match="'format_version' is missing"):
        fmt.load_manifest(b)


def test_the_exported_manifest_passes_and_reads_back(tiny_bundle):
    m = fmt.load_manifest(tiny_bundle)
    fmt.check_manifest(m)
    from phi3v_edge.runtime.model_facts import CROP_SIZE, rope_attention_factor

    r = m["rope"]
    assert r["attention_factor"] == rope_attention_factor(r["max_position_embeddings"],
                                                          r["original_max_position_embeddings"])
    assert m["processor"]["crop_size"] == m["vision"]["crop_size"] == CROP_SIZE
    assert m["processor"]["num_img_tokens"] == m["vision"]["tokens_per_crop"] == 144
