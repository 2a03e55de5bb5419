"""Video clips as sampled frames (runtime/video.py) and the batched HD transform (runtime/frames.py).

Clips are written with PyAV itself (mp4 with its bundled mpeg4 encoder, and an mjpeg .avi), every frame a
distinct solid colour so order can be read back; frames decoded independently (PyAV directly) are the oracle
for which frames were picked, and the same frames passed as images are the oracle for the tokens.
"""
from __future__ import annotations

import base64
import io
import json
import math
import sys
from pathlib import Path

import av  # PyAV (the [video] extra, in the test extra too) builds and reads the test clips
import numpy as np
import pytest
from PIL import Image

from phi3v_edge.runtime import Phi3VRuntime, frames as F, image_transform as T, video as V
from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.cli import main
from phi3v_edge.runtime.processor import Phi3VProcessor

PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128),
           (255, 255, 255), (0, 0, 0), (255, 128, 0)]
RATE = 5  # frames per second: 10 frames = 2.0 s, frame k shown from 0.2 k s
LONG = [(4 * k, 255 - 4 * k, (37 * k) % 256) for k in range(60)]  # 60 distinct colours: 12 s


def write_clip(path, codec="mpeg4", size=(64, 48), colours=PALETTE, rate=RATE, rotation=None, options=None):
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate, options=options or {})
        s.width, s.height = w, h
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if rotation is not None:
            s.set_display_rotation(rotation)  # a display matrix, as phones write for portrait clips
        for col in colours:
            a = np.empty((h, w, 3), np.uint8)
            a[:] = col
            if rotation is not None:
                a[h // 2:] = 0  # top half coloured, bottom half black: the turn is visible
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def colour_index(img: Image.Image) -> int:
    """Which palette colour a decoded (lossy) frame is: the nearest one to its mean colour."""
    mean = np.asarray(img, np.float32).reshape(-1, 3).mean(0)
    return int(np.argmin(((np.asarray(PALETTE, np.float32) - mean) ** 2).sum(1)))


def decoded_with_pyav(path, indices):
    """Frames `indices` (presentation order) decoded with PyAV directly: the oracle for what video.py picks."""
    with av.open(path) as c:
        frames = [f.to_image().convert("RGB") for f in c.decode(c.streams.video[0])]
    return [frames[i] for i in indices]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    out = {"mp4": write_clip(d / "colours.mp4"), "avi": write_clip(d / "colours.avi", codec="mjpeg"),
           "portrait": write_clip(d / "portrait.mp4", size=(48, 80), colours=PALETTE[:4]),
           # 12 s, 60 frames, keyframes every 12 frames (mpeg4's default GOP): seeking has work to do
           "long": write_clip(d / "long.mp4", colours=LONG)}
    if "libx264" in av.codecs_available:  # B-frames: decode order differs from presentation order
        out["x264"] = write_clip(d / "bframes.mp4", codec="libx264", colours=LONG, options={"g": "15", "bf": "3"})
    c = av.open(str(d / "empty.mp4"), "w")  # a stream and no frames: the muxer drops the stream
    s = c.add_stream("mpeg4", rate=RATE)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    c.start_encoding()
    c.close()
    out["empty"] = str(d / "empty.mp4")
    with av.open(str(d / "audio.mp4"), "w") as c:  # audio only: no video stream
        s = c.add_stream("aac", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        f.sample_rate = 8000
        for p in list(s.encode(f)) + list(s.encode()):
            c.mux(p)
    out["audio"] = str(d / "audio.mp4")
    return out


# ---------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("kind", ["mp4", "avi"])
@pytest.mark.parametrize("kw, picked", [
    (dict(frames=10), list(range(10))),
    (dict(frames=3), [1, 5, 8]),  # middles of thirds: 0.33, 1.0, 1.67 s
    (dict(frames=1), [5]),
    ({}, [1, 3, 6, 8]),  # DEFAULT_FRAMES = 4: 0.25, 0.75, 1.25, 1.75 s
    (dict(fps=1), [0, 5]),
    (dict(fps=2.5), [0, 2, 4, 6, 8]),
    (dict(fps=100), list(range(10))),  # above the clip's rate: every frame once
])
def test_frames_count_order_and_timestamps(clips, kind, kw, picked):
    clip = V.video_frames(clips[kind], **kw)
    assert len(clip) == len(picked) == len(clip.timestamps)
    assert [colour_index(f) for f in clip.frames] == picked
    assert clip.timestamps == pytest.approx([0.2 * k for k in picked], abs=1e-6)
    oracle = decoded_with_pyav(clips[kind], picked)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(clip.frames, oracle))
    assert clip.info.num_frames == 10 and clip.info.duration == pytest.approx(2.0)
    assert (clip.info.width, clip.info.height) == (64, 48)


@pytest.mark.parametrize("seeking", [True, False])
@pytest.mark.parametrize("kind, kw", [("long", dict(frames=5)), ("long", dict(fps=1.5)), ("long", dict(frames=60)),
                                      ("avi", dict(frames=3)),  # avi: mjpeg, every frame a keyframe
                                      ("x264", dict(frames=7)), ("x264", dict(fps=0.7))])
def test_seeking_gives_the_frames_a_full_decode_gives(clips, monkeypatch, seeking, kind, kw):
    if kind not in clips:
        pytest.skip("this PyAV build has no libx264 encoder")
    monkeypatch.setattr(V, "SEEKING", seeking)
    info = V.probe(clips[kind])
    if kind == "avi":
        assert info.keyframes.tolist() == list(range(10))
    else:  # inter frames between keyframes: seeking skips work
        assert 1 < len(info.keyframes) < info.num_frames and info.keyframes[0] == 0
    clip = V.video_frames(clips[kind], **kw)
    idx = [round(t * RATE) for t in clip.timestamps]
    oracle = decoded_with_pyav(clips[kind], idx)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(clip.frames, oracle))
    assert len(clip) == (kw["frames"] if "frames" in kw else math.ceil(12 * kw["fps"]))


def test_display_rotation_is_applied(tmp_path, processor):
    """A landscape-coded clip with a display matrix of -90 degrees (a phone's portrait clip): frames come out
    turned clockwise as players show them (the top edge becomes the right edge), sized and budgeted so."""
    if not hasattr(av.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix")
    path = write_clip(tmp_path / "rotated.mp4", size=(96, 48), colours=PALETTE[:3], rotation=-90)
    clip = V.video_frames(path, frames=3)
    assert clip.info.rotation == 270 and (clip.info.width, clip.info.height) == (48, 96)
    a = np.asarray(clip.frames[1], np.float32)  # PALETTE[1] is green
    assert a.shape == (96, 48, 3)
    assert a[:, 28:, 1].mean() > 200 and a[:, :20].max() < 40  # right half green, left half black
    b = V.frame_budget(processor, clip.info, 3, 4, 4096, 8)
    assert b.tokens_per_frame == T.num_image_tokens_for(48, 96, 4) != T.num_image_tokens_for(96, 48, 4)
    prompt, images = build_prompt([{"role": "user", "content": "", "images": clip.frames}])
    assert b.prompt_tokens == processor(prompt, images, num_crops=4).input_ids.shape[1]


def test_bytes_and_path_give_the_same_frames(clips):
    data = Path(clips["mp4"]).read_bytes()
    a, b = V.video_frames(clips["mp4"], frames=3), V.video_frames(data, frames=3)
    assert a.timestamps == b.timestamps
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.frames, b.frames))
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    c = V.frames_from_data_url(url, frames=3)
    assert c.timestamps == a.timestamps and [colour_index(f) for f in c.frames] == [1, 5, 8]


@pytest.mark.parametrize("url, words", [
    ("https://example.invalid/clip.mp4", "must be a data URL"),
    ("data:video/mp4;base64", "no ','"),
    ("data:video/mp4,AAAA", "base64"),
    ("data:image/png;base64,AAAA", "expected video/"),
    ("data:video/mp4;base64,@@@@", "malformed"),
])
def test_bad_data_urls(url, words):
    with pytest.raises(V.VideoError, match=words):
        V.decode_data_url(url)


def _corrupt(clips):
    data = bytearray(Path(clips["mp4"]).read_bytes())
    return bytes(data[:100]) + b"\0" * (len(data) - 100)


@pytest.mark.parametrize("source, kw, words", [
    (lambda c: b"this is not a video file " * 20, {}, "not a readable video file"),
    (_corrupt, {}, "not a readable video file"),
    (lambda c: b"", {}, "empty"),
    (lambda c: c["mp4"] + ".missing", {}, "no such file"),
    (lambda c: c["empty"], {}, "no video stream"),
    (lambda c: c["audio"], {}, r"no video stream \(streams: audio\)"),
    (lambda c: c["mp4"], dict(frames=0), "frames must be >= 1"),
    (lambda c: c["mp4"], dict(frames=-2), "frames must be >= 1"),
    (lambda c: c["mp4"], dict(frames=2.5), "frames must be an integer"),
    (lambda c: c["mp4"], dict(fps=0), "fps must be a finite number > 0"),
    (lambda c: c["mp4"], dict(fps=-1.0), "fps must be a finite number > 0"),
    (lambda c: c["mp4"], dict(fps=float("inf")), "fps must be a finite number > 0"),
    (lambda c: c["mp4"], dict(frames=2, fps=1.0), "not both"),
    (lambda c: c["mp4"], dict(frames=11), "has only 10 frames"),
    (lambda c: 42, {}, "file path or the file's bytes"),
])
def test_bad_clips_and_values_are_clear_errors(clips, source, kw, words):
    with pytest.raises(V.VideoError, match=words) as e:
        V.video_frames(source(clips), **kw)
    assert isinstance(e.value, ValueError)  # an InputError: a 400 for a server, exit 2 for the CLI


def test_pyav_missing_says_how_to_install(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(V.VideoError, match=r"pip install 'phi3v-edge\[video\]'"):
        V.video_frames(clips["mp4"], frames=2)


# ------------------------------------------------------------------------------------------ budget


@pytest.fixture(scope="module")
def processor(tiny_bundle):
    return Phi3VProcessor.from_pretrained(tiny_bundle)


def test_budget_counts_the_real_prompt(clips, processor):
    info = V.probe(clips["mp4"])
    for n, crops in [(1, 1), (3, 4), (5, 2)]:
        b = V.frame_budget(processor, info, n, crops, 4096, 16, text="What happens?")
        frames = V.video_frames(clips["mp4"], frames=n).frames
        prompt, images = build_prompt([{"role": "user", "content": "What happens?", "images": frames}])
        out = processor(prompt, images, num_crops=crops)  # real preprocessing and tokenization
        assert b.prompt_tokens == out.input_ids.shape[1]
        assert b.tokens_per_frame == out.num_img_tokens[0]


@pytest.mark.parametrize("max_length, crops", [(4096, 4), (2000, 1), (3000, 2)])
def test_max_frames_is_the_largest_that_fits(clips, processor, max_length, crops):
    info = V.probe(clips["mp4"])
    b = V.frame_budget(processor, info, 1, crops, max_length, 64, text="Describe.")
    assert b.max_frames >= 1
    ok = V.check_budget(processor, info, b.max_frames, crops, max_length, 64, text="Describe.")
    assert ok.prompt_tokens + 64 <= max_length
    with pytest.raises(V.VideoError) as e:
        V.check_budget(processor, info, b.max_frames + 1, crops, max_length, 64, text="Describe.")
    over = V.frame_budget(processor, info, b.max_frames + 1, crops, max_length, 64, text="Describe.")
    msg = str(e.value)
    assert f"max_length {max_length}" in msg and f"at most {b.max_frames} fit" in msg
    assert f"{over.prompt_tokens} tokens" in msg and f"at least {over.prompt_tokens + 64}" in msg


def test_too_many_frames_fail_before_any_decoding(clips, processor, monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("frames were decoded before the budget check")

    monkeypatch.setattr(V, "decode_frames", no_decoding)
    with pytest.raises(V.VideoError, match=r"10 frames of 64x48 at num_crops 4 take 10 x 757 image tokens.*"
                                           r"max_length 4096.*fewer crops \(num_crops 1: 313 tokens a frame"):
        V.video_request(processor, clips["mp4"], "Describe.", frames=10, num_crops=4, max_length=4096,
                        max_new_tokens=32)


# --------------------------------------------------------------------------- batched preprocessing


@pytest.mark.parametrize("w, h, crops", [(640, 360, 4), (360, 640, 4), (64, 48, 1), (1280, 720, 16), (333, 1000, 9),
                                         (2000, 90, 5), (90, 1500, 16), (500, 500, 2)])
def test_batched_transform_equals_per_image(w, h, crops):
    rng = np.random.default_rng(w * 7 + h)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)]
    pv, sizes, tokens = T.preprocess_images(frames, crops)
    bpv, bsizes, btokens = F.preprocess_same_size(frames, crops)
    assert np.array_equal(pv, bpv)  # bit for bit
    assert np.array_equal(sizes, bsizes) and tokens == btokens
    assert tokens == [T.num_image_tokens_for(w, h, crops)] * 2


def test_batched_transform_of_clip_frames_and_mixed_sizes(clips):
    frames = V.video_frames(clips["mp4"], frames=4).frames + V.video_frames(clips["portrait"], frames=2).frames
    for crops in (1, 4):
        pv, sizes, tokens = T.preprocess_images(frames, crops)
        bpv, bsizes, btokens = F.preprocess_same_size(frames, crops)
        assert np.array_equal(pv, bpv) and np.array_equal(sizes, bsizes) and tokens == btokens


def test_bicubic_with_slices_equals_gathers():
    rng = np.random.default_rng(3)
    for h, w in [(336, 336), (672, 1008), (1680, 336), (5376, 336), (100, 500)]:
        x = rng.standard_normal((3, h, w)).astype(np.float32)
        assert np.array_equal(F.resize_bicubic_fast(x, 336, 336), T.resize_bicubic(x, 336, 336))


# ------------------------------------------------------------------- generation: API and CLI


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return Phi3VRuntime(tiny_bundle, provider="cpu", max_length=4096)


@pytest.fixture(scope="module")
def as_images(clips, rt, tmp_path_factory):
    """The reference: frames 1, 5, 8 decoded by PyAV directly, saved as PNG, passed as --image files."""
    d = tmp_path_factory.mktemp("frames")
    paths = []
    for k, im in zip([1, 5, 8], decoded_with_pyav(clips["mp4"], [1, 5, 8])):
        paths.append(str(d / f"frame{k}.png"))
        im.save(paths[-1])
    prompt, images = build_prompt([{"role": "user", "content": "What happens?", "images": paths}])
    return paths, rt.generate(prompt, images, num_crops=1, max_new_tokens=6, stop_ids=())


def test_video_tokens_equal_the_same_frames_as_images(clips, rt, as_images):
    req = V.video_request(rt.processor, clips["mp4"], "What happens?", frames=3, num_crops=1,
                          max_length=rt.max_length, max_new_tokens=6)
    assert req.timestamps == pytest.approx([0.2, 1.0, 1.6])
    assert req.prompt == build_prompt([{"role": "user", "content": "What happens?", "images": [0, 0, 0]}])[0]
    r = rt.generate(req.prompt, req.images, num_crops=1, max_new_tokens=6, stop_ids=())
    assert r.token_ids == as_images[1].token_ids and len(r.token_ids) == 6
    assert r.prompt_tokens == req.prompt_tokens == as_images[1].prompt_tokens


def test_cli_generate_video_json(clips, tiny_bundle, as_images, capsys):
    rc = main(["generate", str(tiny_bundle), "--prompt", "What happens?", "--video", clips["mp4"], "--frames", "3",
               "--num-crops", "1", "--max-new-tokens", "6", "--ignore-eos", "--provider", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["token_ids"] == as_images[1].token_ids
    assert [f["timestamp"] for f in obj["video"]["frames"]] == pytest.approx([0.2, 1.0, 1.6])
    assert [f["image"] for f in obj["video"]["frames"]] == [1, 2, 3]
    assert obj["video"]["tokens_per_frame"] == 313 and "3 frames at 0.20, 1.00, 1.60 s" in err


def test_cli_video_after_images(clips, tiny_bundle, as_images, capsys):
    """--image files come first: the frames are <|image_2|>, <|image_3|> after them."""
    paths = as_images[0]
    rc = main(["generate", str(tiny_bundle), "--prompt", "What happens?", "--image", paths[0], "--video",
               clips["mp4"], "--fps", "1", "--num-crops", "1", "--max-new-tokens", "4", "--ignore-eos",
               "--provider", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    obj = json.loads(out)
    assert [f["image"] for f in obj["video"]["frames"]] == [2, 3]
    assert [f["timestamp"] for f in obj["video"]["frames"]] == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("tail, words", [
    (["--frames", "10", "--num-crops", "4"], ["max_length 4096", "at most 5 fit", "num_crops 1"]),
    (["--frames", "0"], ["frames must be >= 1"]),
    (["--fps", "-1"], ["fps must be a finite number > 0"]),
    (["--frames", "2", "--fps", "1"], ["not allowed with argument"]),
])
def test_cli_video_errors_exit_2(clips, tiny_bundle, capsys, tail, words):
    rc = main(["generate", str(tiny_bundle), "--prompt", "x", "--video", clips["mp4"], "--provider", "cpu",
               "--max-new-tokens", "32"] + tail)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_cli_bad_video_options_fail_before_the_bundle_loads(clips, tmp_path, capsys):
    """No bundle at all: the sampling values and the file are checked first."""
    for tail, words in [(["--video", clips["mp4"], "--frames", "0"], "frames must be >= 1"),
                        (["--video", clips["mp4"], "--fps", "0"], "fps must be a finite number > 0"),
                        (["--video", str(tmp_path / "nope.mp4")], "no such file")]:
        rc = main(["generate", str(tmp_path / "no-bundle"), "--prompt", "x"] + tail)
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "bundle" not in err, err


def test_cli_corrupt_video_exit_2(tmp_path, tiny_bundle, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    rc = main(["generate", str(tiny_bundle), "--prompt", "x", "--video", str(bad), "--provider", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a readable video file" in err


def test_chat_video_command(clips, tiny_bundle, as_images, monkeypatch, capsys):
    stdin = f"/video {clips['mp4']}.missing\n/video {clips['mp4']}\nWhat happens?\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(["chat", str(tiny_bundle), "--frames", "3", "--num-crops", "1", "--max-new-tokens", "6",
               "--ignore-eos", "--provider", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "no such file: the video was not added" in err and "3 frames at 0.20, 1.00, 1.60 s attached" in err
    assert out.strip() == as_images[1].text.strip()


# ------------------------------------------------------------------- a clip in a full model prompt


@pytest.mark.parametrize("prompt, m, n, want", [
    ("<|user|>\nWhat happens?<|end|>\n<|assistant|>\n", 0, 2,
     "<|user|>\n<|image_1|>\n<|image_2|>\nWhat happens?<|end|>\n<|assistant|>\n"),
    ("<|user|>\n<|image_1|>\nAnd this?<|end|>\n<|assistant|>\n", 1, 2,
     "<|user|>\n<|image_1|>\n<|image_2|>\n<|image_3|>\nAnd this?<|end|>\n<|assistant|>\n"),
    ("<|user|>\nFirst<|end|>\n<|assistant|>\nOk<|end|>\n<|user|>\nThen?<|end|>\n<|assistant|>\n", 0, 1,
     "<|user|>\nFirst<|end|>\n<|assistant|>\nOk<|end|>\n<|user|>\n<|image_1|>\nThen?<|end|>\n<|assistant|>\n"),
    ("<|user|>\nClip: <|video|>\nPhoto: <|image_1|>\n?<|end|>\n", 1, 2,
     "<|user|>\nClip: <|image_2|>\n<|image_3|>\nPhoto: <|image_1|>\n?<|end|>\n"),
])
def test_insert_frames(prompt, m, n, want):
    assert V.insert_frames(prompt, m, n) == want


@pytest.mark.parametrize("prompt, words", [("<|video|><|video|>", "one clip per request"),
                                           ("no turns here", "no <|user|> turn")])
def test_insert_frames_errors(prompt, words):
    with pytest.raises(V.VideoError, match=words):
        V.insert_frames(prompt, 0, 2)


def test_prompt_video_tokens_equal_the_same_frames_as_images(clips, rt, as_images):
    prompt, _ = build_prompt([{"role": "user", "content": "What happens?"}])
    req = V.prompt_video(rt.processor, prompt, None, clips["mp4"], frames=3, num_crops=1, max_length=rt.max_length,
                         max_new_tokens=6)
    r = rt.generate(req.prompt, req.images, num_crops=1, max_new_tokens=6, stop_ids=())
    assert r.token_ids == as_images[1].token_ids and req.timestamps == pytest.approx([0.2, 1.0, 1.6])
    with pytest.raises(V.VideoError, match="max_length 4096"):
        V.prompt_video(rt.processor, prompt, None, clips["mp4"], frames=10, num_crops=4, max_length=rt.max_length,
                       max_new_tokens=6)
    with pytest.raises(ValueError, match="placeholder"):  # placeholders must match the images given
        V.prompt_video(rt.processor, "<|user|>\n<|image_1|>\nx<|end|>\n", None, clips["mp4"], frames=2,
                       max_length=rt.max_length, max_new_tokens=6)


def test_api_generate_and_stream_with_video(clips, rt, as_images):
    prompt, _ = build_prompt([{"role": "user", "content": "What happens?"}])
    r = rt.generate(prompt, video=clips["mp4"], video_frames=3, num_crops=1, max_new_tokens=6, stop_ids=())
    assert r.token_ids == as_images[1].token_ids
    assert r.frame_timestamps == pytest.approx([0.2, 1.0, 1.6]) and rt.last_video.timestamps == r.frame_timestamps
    text = "".join(rt.stream(prompt, video=Path(clips["mp4"]).read_bytes(), video_frames=3, num_crops=1,
                             max_new_tokens=6, stop_ids=()))
    streamed = rt.last_result  # the stream's own result (its generator's return value)
    assert text == as_images[1].text and streamed.frame_timestamps == pytest.approx([0.2, 1.0, 1.6])
    assert rt.generate(prompt, num_crops=1, max_new_tokens=2).frame_timestamps is None  # no video, no timestamps
    with pytest.raises(V.VideoError, match="max_length 4096"):
        rt.generate(prompt, video=clips["mp4"], video_frames=10, num_crops=4, max_new_tokens=6)
    with pytest.raises(V.VideoError, match="not a readable video"):
        rt.generate(prompt, video=b"not a video" * 50)
    r = rt.generate(prompt, video=clips["mp4"], video_fps=1.0, num_crops=1, max_new_tokens=2)
    assert r.token_ids and r.frame_timestamps == [0.0, 1.0]  # the runtime stays usable after the errors
    r = rt.chat([{"role": "user", "content": "What happens?"}], video=clips["mp4"], video_frames=3, num_crops=1,
                max_new_tokens=6, stop_ids=())  # chat passes video= on: the frames open the last user turn
    assert r.token_ids == as_images[1].token_ids


# ------------------------------------------------------------------------------ the server's video_url


@pytest.fixture(scope="module")
def client(tiny_bundle):
    """The server's ASGI app over an Engine on the tiny bundle, in process (no socket is opened)."""
    from starlette.testclient import TestClient

    from phi3v_edge.runtime.engine import Engine
    from phi3v_edge.runtime.server.app import ServerConfig, create_app

    eng = Engine(tiny_bundle, provider="cpu", max_batch=1, max_length=4096)
    with TestClient(create_app(eng, ServerConfig(model_name="tiny"), warmup=False)) as c:
        for _ in range(100):
            if c.get("/health").status_code == 200:
                break
            __import__("time").sleep(0.05)
        yield c


def _chat(client, video_url: dict, **extra):
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "num_crops": 1,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": video_url},
                                                      {"type": "text", "text": "What happens?"}]}], **extra}
    return client.post("/v1/chat/completions", json=body)


def test_server_video_url_equals_the_same_frames_as_images(clips, client, as_images):
    url = "data:video/mp4;base64," + base64.b64encode(Path(clips["mp4"]).read_bytes()).decode()
    r = _chat(client, {"url": url, "num_frames": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == as_images[1].text
    assert body["usage"]["prompt_tokens"] == as_images[1].prompt_tokens
    assert _chat(client, {"url": url, "fps": 1}).status_code == 200


@pytest.mark.parametrize("video_url, words", [
    ({"url": "data:video/mp4;base64," + base64.b64encode(b"not a video" * 40).decode()}, "not a readable video"),
    ({"url": "https://example.invalid/clip.mp4"}, "must be a data URL"),
    ({"url": "CLIP", "num_frames": 0}, "frames must be >= 1"),
    ({"url": "CLIP", "num_frames": 10, "fps": 1}, "not both"),
    ({"url": "CLIP", "num_frames": 10, "_crops": 4}, "max_length 4096"),
])
def test_server_bad_video_is_a_400_and_the_server_goes_on(clips, client, video_url, words):
    clip = "data:video/mp4;base64," + base64.b64encode(Path(clips["mp4"]).read_bytes()).decode()
    video_url = {k: (clip if v == "CLIP" else v) for k, v in video_url.items() if k != "_crops"}
    r = _chat(client, video_url, **({"num_crops": 4} if "max_length" in words else {}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"].endswith("video_url") and err["code"] == "invalid_video"
    assert _chat(client, {"url": clip, "num_frames": 2}).status_code == 200
