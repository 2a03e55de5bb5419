"""Tests of the torch-free processor (image transform, tokenizer, chat template) against torch/transformers references."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phi3v_edge.runtime import image_transform as it
from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.processor import Phi3VProcessor, ProcessorOutput
from phi3v_edge.runtime.tokenizer import Phi3VTokenizer, StreamDecoder

ASSETS = Path(__file__).resolve().parents[1] / "models" / "assets" / "phi35v"
PROMPT_1 = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def proc() -> Phi3VProcessor:
    return Phi3VProcessor.from_pretrained(ASSETS)


def rand_image(w, h, seed=0):
    """Random RGB PIL image of width w and height h."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------ torch reference


def ref_hd_size(width, height, hd_num):
    """Reference HD arithmetic (as in Microsoft's processor): padded (H, W) in the original frame."""
    trans = width < height
    if trans:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    tar = int(np.ceil(new_h / 336) * 336)
    return (new_w, tar) if trans else (tar, new_w)


def ref_tokens(h, w):
    return int(((h // 336) * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12)


def ref_process(img, num_crops):
    """Independent torch/PIL implementation of the reference image processor for one image."""
    import torch
    import torch.nn.functional as F

    img = img.convert("RGB")
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    tar = int(np.ceil(new_h / 336) * 336)
    canvas = Image.new("RGB", (new_w, tar), (255, 255, 255))
    canvas.paste(img, (0, int((tar - new_h) / 2)))
    if trans:
        canvas = canvas.transpose(Image.TRANSPOSE)
    x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255.0  # ToTensor
    mean = torch.tensor(it.CLIP_MEAN)[:, None, None]
    std = torch.tensor(it.CLIP_STD)[:, None, None]
    x = (x - mean) / std  # Normalize
    h, w = x.shape[1:]
    glb = F.interpolate(x[None], size=(336, 336), mode="bicubic", align_corners=False)
    tiles = x.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
    crops = torch.cat([glb, tiles], dim=0)
    out = torch.zeros(num_crops + 1, 3, 336, 336)
    out[: crops.shape[0]] = crops
    return out.numpy(), (h, w), ref_tokens(h, w)


# ------------------------------------------------------------------------------ import hygiene


def test_runtime_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "import phi3v_edge.runtime.processor, phi3v_edge.runtime.tokenizer\n"
        "import phi3v_edge.runtime.image_transform, phi3v_edge.runtime.chat_template\n"
        "bad = [m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ token counts


SIZES = [(1, 1), (7, 3), (3, 7), (336, 336), (337, 336), (336, 337), (640, 480), (480, 640), (1920, 1080),
         (1080, 1920), (4000, 300), (300, 4000), (1344, 1343), (999, 1000), (5, 1), (50, 1), (1, 50),
         (2048, 2048), (3000, 2000), (17, 1000)]


@pytest.mark.parametrize("num_crops", range(1, 17))
def test_token_count_formula_every_num_crops(num_crops):
    for w, h in SIZES:
        H, W = ref_hd_size(w, h, num_crops)
        assert it.hd_image_size(w, h, num_crops) == (H, W), (w, h, num_crops)
        assert H % 336 == 0 and W % 336 == 0
        assert (H // 336) * (W // 336) <= num_crops
        assert it.num_image_tokens_for(w, h, num_crops) == ref_tokens(H, W)


@pytest.mark.parametrize("num_crops", range(1, 17))
def test_processor_outputs_consistent_every_num_crops(proc, num_crops):
    imgs = [rand_image(40, 30, seed=1), rand_image(9, 50, seed=2)]  # landscape, portrait
    out = proc("<|image_1|>a<|image_2|>b", imgs, num_crops=num_crops)
    assert out.pixel_values.shape == (2, num_crops + 1, 3, 336, 336)
    assert out.pixel_values.dtype == np.float32
    assert out.image_sizes.dtype == np.int64 and out.input_ids.dtype == np.int64
    for k, im in enumerate(imgs, start=1):
        H, W = ref_hd_size(*im.size, num_crops)
        assert tuple(out.image_sizes[k - 1]) == (H, W)
        assert out.num_img_tokens[k - 1] == ref_tokens(H, W)
        assert int((out.input_ids == -k).sum()) == out.num_img_tokens[k - 1]
        n_valid = (H // 336) * (W // 336) + 1
        nonzero = np.abs(out.pixel_values[k - 1]).reshape(num_crops + 1, -1).max(axis=1) > 0
        assert nonzero[:n_valid].all() and not nonzero[n_valid:].any()


def test_extreme_aspect_ratio_keeps_one_row(proc):
    # The reference computes a resize height of 0 here and fails; we keep one row (deliberate).
    out = proc("<|image_1|>", [rand_image(3000, 1)], num_crops=4)
    assert tuple(out.image_sizes[0]) == (336, 1344)
    out = proc("<|image_1|>", [rand_image(1, 3000)], num_crops=4)
    assert tuple(out.image_sizes[0]) == (1344, 336)


# ------------------------------------------------------------------------------ pixel values


@pytest.mark.parametrize(
    "w,h,num_crops",
    [(640, 480, 4), (480, 640, 4), (50, 400, 16), (1000, 200, 1), (333, 777, 9), (1, 1, 2), (700, 90, 6)],
)
def test_pixel_values_match_torch_reference(proc, w, h, num_crops):
    img = rand_image(w, h, seed=w + h)
    out = proc("<|image_1|>", [img], num_crops=num_crops)
    ref, (H, W), tokens = ref_process(img, num_crops)
    assert tuple(out.image_sizes[0]) == (H, W) and out.num_img_tokens == [tokens]
    np.testing.assert_allclose(out.pixel_values[0], ref, rtol=0, atol=1e-3)
    assert np.abs(out.pixel_values[0, 0] - ref[0]).max() < 1e-4  # global view (crop 0)


@pytest.mark.parametrize("hw,out_hw", [((336, 1344), (336, 336)), ((1008, 672), (336, 336)), ((337, 500), (336, 336)),
                                       ((100, 50), (336, 336)), ((1000, 3000), (336, 336)), ((40, 60), (7, 9))])
def test_bicubic_matches_torch_interpolate(hw, out_hw):
    import torch

    x = np.random.default_rng(3).standard_normal((3, *hw)).astype(np.float32) * 2
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=out_hw, mode="bicubic",
                                          align_corners=False)[0].numpy()
    assert np.abs(it.resize_bicubic(x, *out_hw) - ref).max() < 1e-4


def test_portrait_is_transposed_landscape(proc):
    land = rand_image(500, 300, seed=7)
    port = land.transpose(Image.TRANSPOSE)
    a = proc("<|image_1|>", [land], num_crops=6)
    b = proc("<|image_1|>", [port], num_crops=6)
    (H, W), (H2, W2) = a.image_sizes[0], b.image_sizes[0]
    assert (H2, W2) == (W, H)
    np.testing.assert_allclose(b.pixel_values[0, 0], a.pixel_values[0, 0].transpose(0, 2, 1), atol=1e-5)
    rows, cols = H // 336, W // 336  # landscape tile grid; portrait grid is cols x rows
    for r in range(rows):
        for c in range(cols):
            ta = a.pixel_values[0, 1 + r * cols + c]
            tb = b.pixel_values[0, 1 + c * rows + r]
            np.testing.assert_array_equal(tb, ta.transpose(0, 2, 1))
    # The portrait image is padded left/right (white) rather than top/bottom.
    white = (1.0 - np.asarray(it.CLIP_MEAN, np.float32)) / np.asarray(it.CLIP_STD, np.float32)
    first_tile = b.pixel_values[0, 1]  # top-left tile: column 0 is padding
    np.testing.assert_allclose(first_tile[:, :, 0], np.broadcast_to(white[:, None], (3, 336)), atol=1e-6)


# ------------------------------------------------------------------------------ image modes and sources


def test_image_modes_accepted(proc):
    base = rand_image(60, 40, seed=5)
    ref = proc("<|image_1|>", [base]).pixel_values
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: alpha is dropped, not composited onto anything
    np.testing.assert_array_equal(proc("<|image_1|>", [rgba]).pixel_values, ref)
    for mode in ["L", "P", "CMYK", "LA", "1", "I;16", "I;16B", "I", "F", "YCbCr"]:
        if mode in ("I;16", "I;16B"):
            im = image_16bit(np.asarray(base.convert("L")).astype(np.uint16) * 257, mode)
        else:
            im = base.convert(mode)
        out = proc("<|image_1|>", [im])
        assert out.pixel_values.shape == ref.shape and np.isfinite(out.pixel_values).all(), mode


def image_16bit(a16, mode):
    """uint16 array [H, W] -> PIL image of mode I;16 (little endian), I;16B (big endian) or I (int32)."""
    h, w = a16.shape
    if mode == "I":
        return Image.frombytes("I", (w, h), a16.astype("<i4").tobytes())
    return Image.frombytes(mode, (w, h), a16.astype(">u2" if mode == "I;16B" else "<u2").tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_scaled_not_white(mode):
    a16 = np.array([[0, 0x0100, 0x8000, 0xFFFF]], dtype=np.uint16)  # -> 0, 1, 128, 255
    im = image_16bit(a16, mode)
    assert im.mode == mode
    rgb = it.load_image(im)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 1], np.asarray(rgb)[0, :, 2])


def test_sixteen_bit_png_file(tmp_path):
    a16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    p = tmp_path / "g16.png"
    image_16bit(a16, "I;16").save(p)
    rgb = np.asarray(it.load_image(p))
    np.testing.assert_array_equal(rgb[..., 0], (a16 >> 8).astype(np.uint8))


def test_paths_and_bytes_equal_pil(proc, tmp_path):
    img = rand_image(123, 77, seed=9)
    p = tmp_path / "x.png"
    img.save(p)
    ref = proc("<|image_1|>", [img]).pixel_values
    for src in [str(p), p, p.read_bytes(), bytearray(p.read_bytes())]:
        np.testing.assert_array_equal(proc("<|image_1|>", [src]).pixel_values, ref)
    # single image without a list, and the caller's image is not modified
    np.testing.assert_array_equal(proc("<|image_1|>", img).pixel_values, ref)
    assert img.size == (123, 77) and img.mode == "RGB"
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    assert proc("<|image_1|>", [buf.getvalue()]).pixel_values.shape == ref.shape


# ------------------------------------------------------------------------------ bad inputs


def png_header_only(width, height):
    """A PNG whose header claims width x height (bit depth 1, grey) with no real pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_inputs_raise_value_error_and_processor_survives(proc, tmp_path):
    good = rand_image(30, 20)
    png = io.BytesIO()
    good.save(png, "PNG")
    cases = [
        (b"definitely not an image", "cannot read image"),
        (b"", "cannot read image"),
        (png.getvalue()[:60], "cannot read image"),  # truncated
        (str(tmp_path / "missing.png"), "no such file"),
        (tmp_path, "no such file"),  # a directory
        (Image.new("RGB", (0, 5)), "zero size"),
        (png_header_only(9000, 9000), "too large"),  # 81 MP > 64 MP default limit, refused before decoding
        (12345, "cannot read image of type int"),
        (Image.open(io.BytesIO(png.getvalue()[:60])), "cannot read image"),  # lazily opened, truncated
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            proc("<|image_1|>", [bad])
        assert proc("<|image_1|>", [good]).num_img_tokens == [proc.num_image_tokens_for(30, 20)]


def test_pixel_limit_configurable_and_pil_bomb_error():
    img = rand_image(100, 100)
    with pytest.raises(ValueError, match="too large"):
        it.load_image(img, max_pixels=9_999)
    assert it.load_image(img, max_pixels=10_000).size == (100, 100)
    p = Phi3VProcessor.from_pretrained(ASSETS, max_pixels=5000)
    with pytest.raises(ValueError, match="too large"):
        p("<|image_1|>", [img])
    # Without our own limit, Pillow's DecompressionBombError (> 2 * MAX_IMAGE_PIXELS) is also a ValueError.
    with pytest.raises(ValueError, match="decompression bomb"):
        it.load_image(png_header_only(20000, 20000), max_pixels=None)


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, True, "4"])
def test_num_crops_out_of_range(proc, bad):
    with pytest.raises(ValueError, match="num_crops"):
        proc("<|image_1|>", [rand_image(10, 10)], num_crops=bad)
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VProcessor.from_pretrained(ASSETS, num_crops=bad)
    with pytest.raises(ValueError, match="num_crops"):
        it.num_image_tokens_for(10, 10, bad)
    assert proc("<|image_1|>", [rand_image(10, 10)]).pixel_values.shape[1] == 5


def test_from_pretrained_defaults_and_missing_files(tmp_path):
    p = Phi3VProcessor.from_pretrained(ASSETS)
    assert p.num_crops == 4
    assert p.image_mean == pytest.approx(it.CLIP_MEAN) and p.image_std == pytest.approx(it.CLIP_STD)
    assert Phi3VProcessor.from_pretrained(ASSETS, num_crops=16).num_crops == 16
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Phi3VProcessor.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------ chat template


def test_build_prompt_format():
    msgs = [{"role": "user", "content": "Hi"}]
    assert build_prompt(msgs) == ("<|user|>\nHi<|end|>\n<|assistant|>\n", [])
    assert build_prompt(msgs, add_generation_prompt=False) == ("<|user|>\nHi<|end|>\n", [])
    a, b, c = object(), object(), object()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Compare these.", "images": [a, b]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "And this?", "images": [c]},
    ]
    text, images = build_prompt(msgs)
    assert text == (
        "<|system|>\nBe brief.<|end|>\n"
        "<|user|>\n<|image_1|>\n<|image_2|>\nCompare these.<|end|>\n"
        "<|assistant|>\nThey differ.<|end|>\n"
        "<|user|>\n<|image_3|>\nAnd this?<|end|>\n"
        "<|assistant|>\n"
    )
    assert images == [a, b, c]
    text, _ = build_prompt(msgs[:3])  # ends with the assistant: no generation prompt
    assert text.endswith("<|assistant|>\nThey differ.<|end|>\n")
    for bad in [[], [{"content": "x"}], [{"role": "user", "content": 3}], "hello", [("user", "x")]]:
        with pytest.raises(ValueError):
            build_prompt(bad)


def test_build_prompt_equals_jinja_template():
    import jinja2

    template = json.loads((ASSETS / "tokenizer_config.json").read_text())["chat_template"]
    tpl = jinja2.Environment().from_string(template)
    convs = [
        [{"role": "user", "content": "Hello\nthere "}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "<|image_1|>\nx"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    for msgs in convs:
        for gen in (True, False):
            assert build_prompt(msgs, gen)[0] == tpl.render(messages=msgs, add_generation_prompt=gen)


# ------------------------------------------------------------------------------ placeholders and ids


def test_placeholder_validation(proc):
    im1, im2 = rand_image(20, 20, 1), rand_image(20, 20, 2)
    with pytest.raises(ValueError, match="prompt has 2 image placeholders but 1 image was given"):
        proc("<|image_1|><|image_2|>", [im1])
    with pytest.raises(ValueError, match="prompt has 1 image placeholder but 2 images were given"):
        proc("<|image_1|>", [im1, im2])
    with pytest.raises(ValueError, match="prompt has 0 image placeholders but 1 image was given"):
        proc("hello", [im1])
    with pytest.raises(ValueError, match="prompt has 1 image placeholder but 0 images were given"):
        proc("<|image_1|>")
    with pytest.raises(ValueError, match=r"<\|image_1\|> appears more than once"):
        proc("<|image_1|><|image_1|>", [im1, im2])
    with pytest.raises(ValueError, match=r"found <\|image_3\|>, missing <\|image_2\|>"):
        proc("<|image_1|><|image_3|>", [im1, im2])
    with pytest.raises(ValueError, match=r"found <\|image_0\|>"):
        proc("<|image_0|>", [im1])
    with pytest.raises(ValueError, match="prompt must be a str"):
        proc(None)
    # any order is fine
    out = proc("<|image_2|> then <|image_1|>", [im1, rand_image(500, 60, 3)])
    ids = out.input_ids[0]
    first = np.flatnonzero(ids < 0)[0]
    assert ids[first] == -2 and int((ids == -2).sum()) == out.num_img_tokens[1]
    # text only
    for images in (None, []):
        out = proc("<|user|>\nHi<|end|>\n<|assistant|>\n", images)
        assert out.pixel_values is None and out.image_sizes is None and out.num_img_tokens == []
        assert out.input_ids.tolist() == [proc.tokenizer.encode("<|user|>\nHi<|end|>\n<|assistant|>\n")]


def test_input_ids_layout(proc):
    tk = proc.tokenizer
    im1, im2 = rand_image(640, 480, 1), rand_image(100, 300, 2)
    prompt = "<|user|>\n<|image_1|><|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    out = proc(prompt, [im1, im2])
    n1, n2 = out.num_img_tokens
    chunks = ["<|user|>\n", "", "\nCompare.<|end|>\n<|assistant|>\n"]
    expected = tk.encode(chunks[0]) + [-1] * n1 + [1] + [-2] * n2 + tk.encode(chunks[2])
    assert out.input_ids.shape == (1, len(expected))
    assert out.input_ids[0].tolist() == expected
    assert tk.encode("") == [1]  # the empty chunk between two adjacent images is a lone BOS
    assert expected[:4] == [1, 32010, 29871, 13]  # tokenizer.json semantics (see test below)
    # BOS starts each chunk: 3 chunks -> 3 BOS
    assert int((out.input_ids == 1).sum()) == 3
    assert out.input_ids[0, 0] == 1


def test_tokenizer_vs_transformers(tmp_path):
    import transformers

    ours = Phi3VTokenizer.from_pretrained(ASSETS)
    # transformers loading tokenizer.json verbatim (what Microsoft's fast tokenizer ran) agrees everywhere.
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / "tokenizer.json"))
    chunks = ["", "<|user|>\n", "\nWhat is in the image?<|end|>\n<|assistant|>\n", " leading space",
              "Héllo 😀 中文 naïve", "  two", "<|system|>\nYou are helpful.<|end|>\n", "a\n\nb"]
    for c in chunks:
        assert ours.encode(c) == fast(c).input_ids, c
        assert ours.encode(c, bos=False) == fast(c, add_special_tokens=False).input_ids, c
    # AutoTokenizer on the tokenizer files (auto_map dropped: no remote code). transformers 5 builds
    # its own LlamaTokenizer pipeline (Metaspace, prepend_scheme "first") instead of the
    # tokenizer.json normalizer: it agrees on plain text but drops the "▁" after special tokens and
    # merges a leading space. We trust tokenizer.json (what the model was trained/served with).
    for name in ["tokenizer.json", "special_tokens_map.json"]:
        (tmp_path / name).write_bytes((ASSETS / name).read_bytes())
    cfg = json.loads((ASSETS / "tokenizer_config.json").read_text())
    cfg.pop("auto_map", None)
    cfg.pop("processor_class", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for c in ["", "Hello world", "Héllo 😀 中文 naïve", "What is in the image?", "a\n\nb", "\n"]:
        assert ours.encode(c) == auto(c).input_ids, c
    assert ours.encode("<|user|>\n") == [1, 32010, 29871, 13]


# ------------------------------------------------------------------------------ detokenizer


STREAM_TEXT = "Héllo wörld — naïve café, 你好，世界！😀🎉👨‍👩‍👧 e\u0301 ok\n  two  spaces\tand ŝ ∑ 𝔘"


def test_decode_roundtrip(proc):
    tk = proc.tokenizer
    ids = tk.encode(STREAM_TEXT)
    assert any(tk.id_to_token(i).startswith("<0x") for i in ids)  # byte-fallback tokens are exercised
    assert tk.decode(ids) == STREAM_TEXT
    assert tk.decode([-1, -1] + ids) == STREAM_TEXT  # image placeholders are ignored


def test_stream_decoder_equals_full_decode(proc):
    tk = proc.tokenizer
    ids = tk.encode(STREAM_TEXT, bos=False) + [32007] + tk.encode(" after <|end|> text", bos=False)
    full = tk.decode(ids)
    d = tk.stream_decoder()
    deltas = [d.put(i) for i in ids]
    deltas.append(d.flush())
    assert "".join(deltas) == full == d.text
    assert all("\ufffd" not in x for x in deltas)
    # random chunking, and the generator API
    rng = np.random.default_rng(0)
    d2 = StreamDecoder(tk)
    pos, parts = 0, []
    while pos < len(ids):
        n = int(rng.integers(1, 5))
        parts.append(d2.put(ids[pos : pos + n]))
        pos += n
    assert "".join(parts) + d2.flush() == full
    assert "".join(tk.stream_decoder().stream(iter(ids))) == full
    # a leading BOS and a space-first token at the start of the stream behave like decode()
    ids_b = tk.encode(" lead", bos=True)
    assert "".join(tk.stream_decoder().stream(ids_b)) == tk.decode(ids_b)


def test_stream_decoder_window_stays_small_and_flushes_partial_bytes(proc):
    tk = proc.tokenizer
    ids = tk.encode("The quick brown fox jumps over the lazy dog. " * 50, bos=False)
    d = tk.stream_decoder()
    longest = 0
    for i in ids:
        d.put(i)
        longest = max(longest, len(d._ids))
    assert longest <= 4 and d.text == tk.decode(ids)
    # an unfinished multi-byte character is held back, then flushed as U+FFFD at the end
    e2 = tk.token_to_id("<0xE2>")
    d = tk.stream_decoder()
    assert d.put(tk.encode("x", bos=False)) == "x"
    assert d.put(e2) == ""
    assert d.flush() == "\ufffd"


# ------------------------------------------------------------------------------ PyTorch side


def test_models_reexport_and_to_torch(proc):
    from phi3v_edge.models import processor as mp

    assert mp.Phi3VProcessor is Phi3VProcessor and mp.build_prompt is build_prompt
    out = proc(PROMPT_1, [rand_image(64, 48)])
    t = mp.to_torch(out)
    assert t["input_ids"].shape == (1, out.input_ids.shape[1]) and str(t["input_ids"].dtype) == "torch.int64"
    assert tuple(t["pixel_values"].shape) == (1, 5, 3, 336, 336) and str(t["pixel_values"].dtype) == "torch.float32"
    assert t["image_sizes"].tolist() == out.image_sizes.tolist()
    assert set(mp.to_torch(proc("hi"))) == {"input_ids"}
    assert isinstance(out, ProcessorOutput)


# ------------------------------------------------------------------------------ numpy arrays (issue 16 item 1)


def test_numpy_arrays_are_images(proc):
    a = np.random.default_rng(3).integers(0, 256, (77, 123, 3), dtype=np.uint8)
    ref = proc("<|image_1|>", [Image.fromarray(a)])
    # one array is ONE image (it used to be read as a list of its 77 rows)
    out = proc("<|image_1|>", a)
    assert out.num_img_tokens == ref.num_img_tokens
    np.testing.assert_array_equal(out.pixel_values, ref.pixel_values)
    two = proc("<|image_1|><|image_2|>", [a, a[::-1]])
    np.testing.assert_array_equal(two.pixel_values[0], ref.pixel_values[0])
    np.testing.assert_array_equal(two.pixel_values[1], proc("<|image_1|>", Image.fromarray(a[::-1].copy())).pixel_values[0])
    # grey [H, W] and [H, W, 1], RGBA (alpha dropped) and non-contiguous views
    g = a[..., 0]
    ref_g = proc("<|image_1|>", Image.fromarray(g)).pixel_values
    np.testing.assert_array_equal(proc("<|image_1|>", g).pixel_values, ref_g)
    np.testing.assert_array_equal(proc("<|image_1|>", g[..., None]).pixel_values, ref_g)
    rgba = np.concatenate([a, np.zeros_like(a[..., :1])], axis=-1)
    np.testing.assert_array_equal(proc("<|image_1|>", rgba).pixel_values, ref.pixel_values)
    np.testing.assert_array_equal(it.load_image(a.transpose(1, 0, 2)), np.asarray(Image.fromarray(a).transpose(Image.TRANSPOSE)))
    # the image is a copy: changing the array afterwards changes nothing
    im = it.load_image(a)
    a2 = a.copy()
    im2 = it.load_image(a2)
    a2[:] = 0
    np.testing.assert_array_equal(np.asarray(im2), np.asarray(im))


@pytest.mark.parametrize("bad, words", [
    (np.zeros((20, 30, 3), np.float32), "dtype float32.*uint8"),
    (np.zeros((2, 20, 30, 3), np.uint8), "shape 2x20x30x3.*list of"),
    (np.zeros((3, 20, 30), np.uint8), "shape 3x20x30.*transpose"),
    (np.zeros((20, 30, 2), np.uint8), r"shape 20x30x2.*\[H, W, 3\]"),
    (np.zeros((0, 30, 3), np.uint8), "zero size"),
    (np.zeros(5, np.uint8), "shape 5 "),
])
def test_bad_arrays_are_clear_input_errors(proc, bad, words):
    from phi3v_edge.runtime.errors import InputError
    from phi3v_edge.runtime.processor import image_list

    for call in (lambda: image_list(bad), lambda: image_list([bad]), lambda: proc("<|image_1|>", bad),
                 lambda: it.load_image(bad)):
        with pytest.raises(InputError, match=words):
            call()
    assert proc("<|image_1|>", np.zeros((20, 30, 3), np.uint8)).num_img_tokens == [proc.num_image_tokens_for(30, 20)]


def test_image_list_forms():
    from phi3v_edge.runtime.errors import InputError
    from phi3v_edge.runtime.processor import image_list

    img = rand_image(8, 8)
    assert image_list(None) == [] and image_list([]) == []
    assert image_list("a.png") == ["a.png"] and image_list(b"xy") == [b"xy"] and image_list(img) == [img]
    assert image_list(("a.png", img)) == ["a.png", img]
    got = image_list(np.zeros((4, 5, 3), np.uint8))
    assert len(got) == 1 and got[0].size == (5, 4) and got[0].mode == "RGB"
    for bad, words in [(5, "got int"), ({"a": 1}, "got dict"), ([img, 3.5], "type float \\(image 2\\)")]:
        with pytest.raises(InputError, match=words):
            image_list(bad)


def test_build_prompt_keeps_placeholders_the_user_wrote():
    a, b, c = object(), object(), object()
    text, images = build_prompt([{"role": "user", "content": "<|image_1|> What color is it?", "images": [a]}])
    assert text == "<|user|>\n<|image_1|> What color is it?<|end|>\n<|assistant|>\n" and images == [a]
    text, images = build_prompt([
        {"role": "user", "content": "x", "images": [a]},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "Is <|image_3|> bigger than <|image_2|>?", "images": [b, c]},
    ])
    assert text.endswith("<|user|>\nIs <|image_3|> bigger than <|image_2|>?<|end|>\n<|assistant|>\n")
    assert text.count("<|image_") == 3 and images == [a, b, c]
    for msgs, words in [
        ([{"role": "user", "content": "x", "images": [a]}, {"role": "user", "content": "<|image_1|> y", "images": [b]}],
         r"message 1 has 1 image and its text holds <\|image_1\|>.*write <\|image_2\|>"),
        ([{"role": "user", "content": "<|image_1|> <|image_1|>", "images": [a, b]}],
         r"write <\|image_1\|>, <\|image_2\|> \(each once\)"),
        ([{"role": "user", "content": "<|image_1|> and", "images": [a, b]}], "or leave the placeholders out"),
    ]:
        with pytest.raises(ValueError, match=words):
            build_prompt(msgs)
