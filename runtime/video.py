"""Video clips as sampled frames of a multi-image prompt. Torch-free; PyAV (the `[video]` extra) is imported lazily.

    clip = video_frames("clip.mp4", frames=8)        # or fps=1.0; a path or the file's bytes
    clip.frames, clip.timestamps                     # RGB PIL images in time order, seconds from the first frame
    req = video_request(processor, "clip.mp4", "What happens?", frames=8, num_crops=4, max_length=4096,
                        max_new_tokens=256)          # budget check first, then decoding
    rt.generate(req.prompt, req.images)              # frame k is <|image_k|>
    rt.generate(prompt, video="clip.mp4", video_frames=8)   # the same through Phi3VRuntime (prompt_video)

Steps (each cheap one before any heavy work):
    probe      open the container, demux the packets (no decoding): frame times, keyframes, frame size,
               duration; the display rotation from the first frame (phone clips: portrait stored landscape)
    sample     frames=N: N frames evenly over the duration, the frame shown at the middle of each of N
               equal segments; fps=F: the frame shown at 0, 1/F, 2/F, ... (each frame at most once)
    budget     the prompt with N placeholders at num_crops must fit max_length with max_new_tokens left:
               tokens per frame come from the frame size alone (image_transform.num_image_tokens_for)
    decode     front to back, seeking to the last keyframe before a chosen frame when it is ahead of the
               decoder; only the chosen frames become RGB images (turned as displayed)

Callers: the CLI (generate --video, chat /video: the CLI glue at the end), Phi3VRuntime.generate/stream
(video=: prompt_video), the server's video_url parts (frames_from_data_url). Frames then go through the
engine like any images; runtime/frames.py preprocesses images of one size together.

Errors are VideoError (an InputError, so a ValueError): unreadable or corrupt file, no video stream,
no frames, bad frames/fps values, too many frames for max_length (with the numbers and what to change),
and PyAV not installed (with the pip command).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image

from .chat_template import build_prompt, image_tag
from .errors import InputError
from .image_transform import DEFAULT_MAX_PIXELS, DEFAULT_NUM_CROPS, check_num_crops, num_image_tokens_for

INSTALL_HINT = "pip install 'phi3v-edge[video]' (or: pip install av)"
DEFAULT_FRAMES = 4  # 4 frames of a 16:9 clip at num_crops 4 take ~3000 tokens: they fit the default max_length 4096
MAX_FRAMES = 256  # a hard cap on one request's frames, before any budget arithmetic

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


class VideoError(InputError):
    """A bad video input (unreadable, no video stream, no frames, bad sampling values, over the token budget),
    or PyAV missing. An InputError (ValueError)."""


def _av():
    try:
        import av  # noqa: PLC0415  (lazy: the runtime works without the [video] extra)
    except ImportError:
        raise VideoError(f"reading video needs PyAV, which is not installed: {INSTALL_HINT}") from None
    return av


@dataclass(frozen=True)
class ClipInfo:
    width: int  # frame size in pixels as displayed (after the stream's rotation), before any transform
    height: int
    duration: float  # seconds, from the first frame's start to the last frame's end
    frame_times: np.ndarray  # [K] float64 seconds from the first frame, sorted (presentation order)
    codec: str
    what: str  # how to name the clip in messages
    start_pts: int = 0  # pts of the first frame, in the stream's time base (seek targets)
    keyframes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # frame indices, increasing
    rotation: int = 0  # degrees counterclockwise the decoded frames are turned for display (0, 90, 180, 270)

    @property
    def num_frames(self) -> int:
        return int(self.frame_times.size)


@dataclass
class VideoFrames:
    frames: list[Image.Image]  # RGB, in time order
    timestamps: list[float]  # seconds from the clip's first frame, one per frame
    info: ClipInfo

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class VideoRequest:
    prompt: str  # the full model prompt: frame k is <|image_k|> (after any images given before the clip)
    images: list  # the request's images in placeholder order: the given images, then the frames
    timestamps: list[float]  # one per frame
    prompt_tokens: int  # length of the prompt in tokens (image tokens included), computed without pixel work
    tokens_per_frame: int
    info: ClipInfo
    frames: list[Image.Image] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- probe


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"from {len(source)} bytes"
    if not isinstance(source, (str, os.PathLike)):
        raise VideoError(f"a video is a file path or the file's bytes, got {type(source).__name__}")
    return repr(os.fspath(source))


def _open(av, source, what: str):
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoError(f"cannot read video {what}: it is empty")
        src = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        src = os.fspath(source)
        if not os.path.isfile(src):
            raise VideoError(f"cannot read video {what}: no such file")
        if os.path.getsize(src) == 0:
            raise VideoError(f"cannot read video {what}: the file is empty")
    else:
        raise VideoError(f"a video is a file path or the file's bytes, got {type(source).__name__}")
    try:
        return av.open(src, mode="r")
    except Exception as e:  # av.error.InvalidDataError and friends (FFmpegError is a ValueError / OSError ...)
        raise VideoError(f"cannot read video {what}: not a readable video file ({_ffmpeg_msg(e)})") from None


def _ffmpeg_msg(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return msg.split(": '")[0] if isinstance(msg, str) else str(msg)


def _video_stream(container, what: str):
    streams = list(container.streams.video)
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(f"video {what} has no video stream (streams: {', '.join(kinds)}): the clip is empty "
                         "or truncated")
    return streams[0]


def probe(source: VideoSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ClipInfo:
    """Frame times, keyframes, frame size and duration of a clip, from its packets (only the first frame is
    decoded, for the display rotation); VideoError for an unreadable, empty or oversized clip."""
    av = _av()
    what = _describe(source)
    with _open(av, source, what) as container:
        stream = _video_stream(container, what)
        ctx = stream.codec_context
        if ctx is None:  # FFmpeg found no decoder for what it read (a truncated or corrupt file)
            raise VideoError(f"cannot read video {what}: its video stream cannot be decoded (corrupt or truncated "
                             "file, or a codec this FFmpeg build lacks)")
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        tb = float(stream.time_base) if stream.time_base else None
        pts, ends, keys = [], [], []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:  # the flush packet, or a packet without a time
                    continue
                pts.append(int(packet.pts))
                ends.append(int(packet.pts) + int(packet.duration or 0))
                if packet.is_keyframe:
                    keys.append(int(packet.pts))
        except Exception as e:
            raise VideoError(f"cannot read video {what}: corrupt data ({_ffmpeg_msg(e)})") from None
        codec = ctx.name
    if not pts:
        raise VideoError(f"video {what} has no frames: the clip is empty")
    if width <= 0 or height <= 0:
        raise VideoError(f"cannot read video {what}: its frame size is unknown ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(f"video {what}: frames of {width}x{height} = {width * height} pixels exceed the limit "
                         f"of {max_pixels} (raise max_pixels to allow them)")
    if tb is None:
        raise VideoError(f"cannot read video {what}: its stream has no time base")
    rotation = _rotation(av, source, what)
    if rotation in (90, 270):
        width, height = height, width
    order = np.sort(np.asarray(pts, dtype=np.int64))
    keyframes = np.searchsorted(order, np.asarray(sorted(keys), dtype=np.int64))  # [k] frame indices, increasing
    start = int(order[0])
    times = (order - start).astype(np.float64) * tb  # [K] seconds
    end = max(ends)
    if end <= int(order[-1]):  # packets without durations: one average frame interval after the last
        step = float(np.median(np.diff(times))) if times.size > 1 else 0.0
        duration = float(times[-1]) + step
    else:
        duration = (end - start) * tb
    duration = max(duration, float(times[-1]))
    return ClipInfo(width, height, duration, times, codec, what, start, keyframes, rotation)


_TURN = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def _rotation(av, source, what: str) -> int:
    """The display rotation of the clip's frames (a phone's portrait clip is often stored landscape with a
    display matrix), from its first decoded frame: 0, 90, 180 or 270 degrees counterclockwise (others: 0)."""
    with _open(av, source, what) as container:
        try:
            frame = next(container.decode(_video_stream(container, what)), None)
        except Exception as e:
            raise VideoError(f"cannot decode video {what}: corrupt data ({_ffmpeg_msg(e)})") from None
    angle = int(round(getattr(frame, "rotation", 0) or 0)) % 360 if frame is not None else 0
    return angle if angle in _TURN else 0


# --------------------------------------------------------------------------------------------- sample


def check_sampling(frames, fps) -> tuple[int | None, float | None]:
    """(frames, fps) validated: at most one of them; frames an integer >= 1, fps a finite number > 0.
    Neither given: (None, None), which sample_indices reads as min(DEFAULT_FRAMES, the clip's frames)."""
    if frames is not None and fps is not None:
        raise VideoError(f"give either frames (a count) or fps (a rate), not both (got frames={frames!r}, fps={fps!r})")
    if frames is None and fps is None:
        return None, None
    if frames is not None:
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)):
            raise VideoError(f"frames must be an integer >= 1, got {frames!r}")
        if frames < 1:
            raise VideoError(f"frames must be >= 1, got {frames} (how many frames to sample from the clip)")
        if frames > MAX_FRAMES:
            raise VideoError(f"frames must be at most {MAX_FRAMES}, got {frames}")
        return int(frames), None
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)):
        raise VideoError(f"fps must be a number > 0, got {fps!r}")
    if not math.isfinite(float(fps)) or float(fps) <= 0:
        raise VideoError(f"fps must be a finite number > 0, got {fps} (frames to sample per second of the clip)")
    return None, float(fps)


def sample_indices(info: ClipInfo, frames: int | None = None, fps: float | None = None) -> np.ndarray:
    """Indices (into info.frame_times, increasing, distinct) of the frames to keep.

    frames=N: the frame shown at the middle of each of N equal segments of the duration (N <= the clip's
    frame count, else VideoError); fps=F: the frame shown at t = 0, 1/F, 2/F, ... < duration, each frame
    at most once (so F above the clip's own rate gives every frame). Neither: min(DEFAULT_FRAMES, K) frames."""
    frames, fps = check_sampling(frames, fps)
    k = info.num_frames
    if frames is None and fps is None:
        frames = min(DEFAULT_FRAMES, k)
    if frames is not None:
        if frames > k:
            raise VideoError(f"video {info.what} has only {k} frames ({info.duration:.2f} s): "
                             f"ask for at most {k} frames")
        targets = (np.arange(frames) + 0.5) * (info.duration / frames)
    else:
        n = max(1, math.ceil(info.duration * fps - 1e-9))
        targets = np.arange(n) / fps
    idx = np.searchsorted(info.frame_times, targets + 1e-9, side="right") - 1  # the frame shown at each target
    idx = np.unique(np.clip(idx, 0, k - 1))
    if len(idx) > MAX_FRAMES:
        raise VideoError(f"fps={fps} gives {len(idx)} frames from {info.what} ({info.duration:.2f} s), more than "
                         f"the {MAX_FRAMES} allowed: use a lower fps or frames=N")
    return idx


# --------------------------------------------------------------------------------------------- budget


def clip_prompt(text: str, num_frames: int, system: str | None = None, images_before: Sequence = ()) -> str:
    """The chat prompt of one user message: the images given before the clip, then one placeholder per frame
    (<|image_k|> in order), then the text (build_prompt's layout)."""
    msgs = ([{"role": "system", "content": system}] if system else [])
    msgs.append({"role": "user", "content": text, "images": list(images_before) + [None] * num_frames})
    return build_prompt(msgs)[0]


@dataclass(frozen=True)
class Budget:
    num_frames: int
    num_crops: int
    tokens_per_frame: int
    prompt_tokens: int  # prompt length with num_frames frames
    max_new_tokens: int
    max_length: int
    max_frames: int  # the most frames that fit at this num_crops

    @property
    def fits(self) -> bool:
        return self.prompt_tokens + self.max_new_tokens <= self.max_length


def _check_counts(max_length, max_new_tokens) -> None:
    for name, v in (("max_length", max_length), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise VideoError(f"{name} must be an integer >= 1, got {v!r}")


def frame_budget(processor, info: ClipInfo, num_frames: int, num_crops: int, max_length: int, max_new_tokens: int,
                 text: str = "", system: str | None = None, image_tokens_before: Sequence[int] = (),
                 prompt_for: Callable[[int], str] | None = None) -> Budget:
    """Prompt tokens of `num_frames` frames of this clip at num_crops (no pixel work: tokenize the prompt with
    the frames' placeholder counts) and the most frames that fit max_length with max_new_tokens left.

    The prompt with n frames is prompt_for(n), by default clip_prompt(text, n, system) after the images whose
    token counts are image_tokens_before."""
    _check_counts(max_length, max_new_tokens)
    tpf = num_image_tokens_for(info.width, info.height, num_crops)
    before = list(image_tokens_before)
    if prompt_for is None:
        def prompt_for(n: int) -> str:
            return clip_prompt(text, n, system, [None] * len(before))

    def length(n: int) -> int:
        return int(processor.tokenize(prompt_for(n), before + [tpf] * n).size)

    room = max_length - max_new_tokens
    l1 = length(1)
    step = length(2) - l1  # each further frame adds its tokens, a BOS and a newline
    fit = 0 if l1 > room else 1 + (room - l1) // step
    while fit > 0 and length(fit) > room:  # the prompt is affine in n; guard against tokenizer surprises
        fit -= 1
    return Budget(num_frames, num_crops, tpf, length(num_frames), max_new_tokens, max_length, fit)


def check_budget(processor, info: ClipInfo, num_frames: int, num_crops: int, max_length: int, max_new_tokens: int,
                 text: str = "", system: str | None = None, image_tokens_before: Sequence[int] = (),
                 prompt_for: Callable[[int], str] | None = None) -> Budget:
    """frame_budget, raising VideoError with the numbers and what to change when the frames do not fit."""
    b = frame_budget(processor, info, num_frames, num_crops, max_length, max_new_tokens, text, system,
                     image_tokens_before, prompt_for)
    if b.fits:
        return b
    need = b.prompt_tokens + max_new_tokens
    fixes = [f"fewer frames (at most {b.max_frames} fit at num_crops {num_crops})" if b.max_frames
             else f"fewer frames (not even one fits at num_crops {num_crops})"]
    if num_crops > 1:
        one = frame_budget(processor, info, num_frames, 1, max_length, max_new_tokens, text, system,
                           image_tokens_before, prompt_for)
        fixes.append(f"fewer crops (num_crops 1: {one.tokens_per_frame} tokens a frame, {one.max_frames} frames fit)")
    fixes.append(f"a larger max_length (at least {need})")
    raise VideoError(
        f"{num_frames} frames of {info.width}x{info.height} at num_crops {num_crops} take {num_frames} x "
        f"{b.tokens_per_frame} image tokens: the prompt is {b.prompt_tokens} tokens, plus max_new_tokens "
        f"{max_new_tokens} = {need} > max_length {max_length}. Use " + ", or ".join(fixes)
        + (" (or fewer max_new_tokens)" if max_new_tokens > 1 else ""))


# --------------------------------------------------------------------------------------------- decode


SEEKING = True  # False: always decode front to back (the tests compare both)


def _seek_target(info: ClipInfo, k: int, i: int) -> int | None:
    """The keyframe to seek to for frame i with the decoder at frame k: the last keyframe <= i when it lies
    beyond the next frame the decoder would give (seeking then skips work); else None (decode on)."""
    if not SEEKING or info.keyframes.size == 0:
        return None
    j = int(np.searchsorted(info.keyframes, i, side="right")) - 1
    if j < 0:
        return None
    kf = int(info.keyframes[j])
    return kf if kf > k + 1 else None


def decode_frames(source: VideoSource, info: ClipInfo, indices: Sequence[int]) -> VideoFrames:
    """Decode the frames at `indices` (into info.frame_times, increasing) as RGB: front to back, except that the
    decoder seeks to the last keyframe before a chosen frame when that keyframe is ahead of it (frames between
    two chosen ones are not decoded past a keyframe). Frames are placed by their timestamps; a stream without
    them is decoded front to back, counting frames."""
    av = _av()
    indices = sorted({int(i) for i in indices})
    frames: list[Image.Image] = []
    with _open(av, source, info.what) as container:
        stream = _video_stream(container, info.what)
        stream.thread_type = "AUTO"
        tb = float(stream.time_base)
        it, k, timed = None, -1, True  # k: index of the last decoded frame
        try:
            for i in indices:
                kf = _seek_target(info, k, i) if timed else None
                if kf is not None and kf > 0:
                    container.seek(int(info.start_pts + round(info.frame_times[kf] / tb)), stream=stream,
                                   backward=True, any_frame=False)
                    it, k = container.decode(stream), -1
                elif it is None:
                    it = container.decode(stream)
                frame = None
                while k < i:
                    frame = next(it, None)
                    if frame is None:
                        break
                    if frame.pts is None:
                        timed = False
                        k += 1
                    else:
                        k = int(np.searchsorted(info.frame_times, (frame.pts - info.start_pts) * tb + 1e-9,
                                                side="right") - 1)
                if frame is None or k < i:
                    raise VideoError(f"cannot decode video {info.what}: frame {i + 1} of {info.num_frames} "
                                     f"({info.frame_times[i]:.2f} s) is missing (corrupt or truncated file)")
                im = frame.to_image().convert("RGB")  # the frame shown at frame_times[i] (or the next one decoded)
                if info.rotation:
                    im = im.transpose(_TURN[info.rotation])  # as displayed
                if im.size != (info.width, info.height):
                    raise VideoError(f"video {info.what} changes frame size ({im.size[0]}x{im.size[1]}, the stream "
                                     f"says {info.width}x{info.height}): not supported")
                frames.append(im)
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(f"cannot decode video {info.what}: corrupt data ({_ffmpeg_msg(e)})") from None
    return VideoFrames(frames, [round(float(info.frame_times[i]), 6) for i in indices], info)


def video_frames(source: VideoSource, frames: int | None = None, fps: float | None = None, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> VideoFrames:
    """Sample a clip (a path or the file's bytes): frames=N evenly over its duration, or fps=F; neither:
    frames=DEFAULT_FRAMES. Returns RGB PIL images with their timestamps (seconds from the first frame)."""
    check_sampling(frames, fps)  # bad values fail before the file is opened
    info = probe(source, max_pixels)
    return decode_frames(source, info, sample_indices(info, frames, fps))


def video_request(processor, source: VideoSource, text: str, *, frames: int | None = None, fps: float | None = None,
                  num_crops: int | None = None, max_length: int, max_new_tokens: int, system: str | None = None,
                  images: Sequence = (), max_pixels: int | None = DEFAULT_MAX_PIXELS) -> VideoRequest:
    """A clip and a user message -> the prompt (frame k as <|image_k|> after the given `images`) and its images.

    The budget is checked from the frame size before any frame is decoded (VideoError with the numbers when
    the frames do not fit max_length with max_new_tokens left); `images` count towards it too."""
    check_sampling(frames, fps)
    crops = getattr(processor, "num_crops", DEFAULT_NUM_CROPS) if num_crops is None else check_num_crops(num_crops)
    info = probe(source, max_pixels)
    idx = sample_indices(info, frames, fps)
    before = _image_tokens(processor, images, crops)
    b = check_budget(processor, info, len(idx), crops, max_length, max_new_tokens, text, system, before)
    clip = decode_frames(source, info, idx)
    images = list(images) + clip.frames
    prompt = clip_prompt(text, len(clip), system, list(images[:len(before)]))
    return VideoRequest(prompt, images, clip.timestamps, b.prompt_tokens, b.tokens_per_frame, info, clip.frames)


VIDEO_TAG = "<|video|>"  # optional: where the frames' placeholders go in a prompt given with video=
_USER = "<|user|>\n"


def insert_frames(prompt: str, num_images: int, num_frames: int) -> str:
    """The prompt with placeholders <|image_{num_images+1}|> .. for the frames: in place of <|video|> when the
    prompt holds it (once), else at the start of the last user turn, after the placeholders already there
    (build_prompt's layout: a message's images, then its text)."""
    tags = [image_tag(num_images + k) for k in range(1, num_frames + 1)]
    count = prompt.count(VIDEO_TAG)
    if count > 1:
        raise VideoError(f"the prompt holds {VIDEO_TAG} {count} times: one clip per request, one {VIDEO_TAG}")
    if count == 1:
        return prompt.replace(VIDEO_TAG, "\n".join(tags))
    at = prompt.rfind(_USER)
    if at < 0:
        raise VideoError(f"the prompt has no {_USER.strip()} turn for the clip's frames: write {VIDEO_TAG} where "
                         "they go (or build the prompt with build_prompt)")
    at += len(_USER)
    m = _LEADING_TAGS.match(prompt, at)
    at = m.end() if m else at
    return prompt[:at] + "".join(t + "\n" for t in tags) + prompt[at:]


_LEADING_TAGS = re.compile(r"(?:<\|image_\d+\|>\n)+")


def prompt_video(processor, prompt: str, images, source: VideoSource, *, frames: int | None = None,
                 fps: float | None = None, num_crops: int | None = None, max_length: int, max_new_tokens: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> VideoRequest:
    """A full model prompt (with <|image_k|> for `images`, and optionally <|video|>) and a clip -> the prompt
    with the frames' placeholders (insert_frames) and the images followed by the frames. Budget-checked
    before decoding, like video_request: what Phi3VRuntime.generate(prompt, images, video=...) runs."""
    from .processor import check_placeholders, image_list  # noqa: PLC0415

    if not isinstance(prompt, str):
        raise VideoError(f"prompt must be a str, got {type(prompt).__name__}")
    check_sampling(frames, fps)
    images = image_list(images)
    try:
        check_placeholders(prompt.replace(VIDEO_TAG, ""), len(images))
    except ValueError as e:
        raise InputError(str(e)) from None
    crops = getattr(processor, "num_crops", DEFAULT_NUM_CROPS) if num_crops is None else check_num_crops(num_crops)
    info = probe(source, max_pixels)
    idx = sample_indices(info, frames, fps)
    before = _image_tokens(processor, images, crops)
    b = check_budget(processor, info, len(idx), crops, max_length, max_new_tokens, image_tokens_before=before,
                     prompt_for=lambda n: insert_frames(prompt, len(images), n))
    clip = decode_frames(source, info, idx)
    return VideoRequest(insert_frames(prompt, len(images), len(clip)), images + clip.frames, clip.timestamps,
                        b.prompt_tokens, b.tokens_per_frame, info, clip.frames)


def _image_tokens(processor, images: Sequence, num_crops: int) -> list[int]:
    if not images:
        return []
    from .image_transform import load_image  # noqa: PLC0415

    out = []
    for im in images:
        w, h = load_image(im, getattr(processor, "max_pixels", DEFAULT_MAX_PIXELS)).size
        out.append(num_image_tokens_for(w, h, num_crops))
    return out


# ------------------------------------------------------------------------------------------ data URLs


def decode_data_url(url: str) -> bytes:
    """`data:video/mp4;base64,...` -> the file's bytes (VideoError for anything else: only data URLs are read,
    never a network address)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:40] + "..." if isinstance(url, str) and len(url) > 40 else url
        raise VideoError(f"a video URL must be a data URL (data:video/mp4;base64,...), got {shown!r}")
    head, sep, payload = url.partition(",")
    if not sep:
        raise VideoError("malformed data URL: no ',' between the header and the data")
    if not head.endswith(";base64"):
        raise VideoError(f"data URL must be base64-encoded (data:video/...;base64,...), got header {head!r}")
    mime = head[5:].split(";")[0]
    if mime and not (mime.startswith("video/") or mime == "application/octet-stream"):
        raise VideoError(f"data URL has media type {mime!r}, expected video/* (e.g. video/mp4)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise VideoError("data URL: the base64 data is malformed") from None


def frames_from_data_url(url: str, frames: int | None = None, fps: float | None = None, *, processor=None,
                         num_crops: int | None = None, max_length: int | None = None, max_new_tokens: int = 1,
                         max_pixels: int | None = DEFAULT_MAX_PIXELS) -> VideoFrames:
    """video_frames of a `data:video/...;base64,...` URL (the server's `video_url` content part).

    With a processor and max_length: the sampled frames alone (at num_crops, with max_new_tokens left) must fit
    max_length, checked before any frame is decoded (VideoError with the numbers otherwise); the rest of the
    prompt is the engine's own check."""
    data = decode_data_url(url)
    check_sampling(frames, fps)
    info = probe(data, max_pixels)
    idx = sample_indices(info, frames, fps)
    if processor is not None and max_length is not None:
        crops = getattr(processor, "num_crops", DEFAULT_NUM_CROPS) if num_crops is None else check_num_crops(num_crops)
        check_budget(processor, info, len(idx), crops, max_length, max_new_tokens)
    return decode_frames(data, info, idx)


# ------------------------------------------------------------------------------------------ CLI glue


def add_video_args(p, *, with_video: bool = True) -> None:
    """The CLI's clip options: --video PATH (generate), --frames N / --fps F and their defaults (generate, chat)."""
    if with_video:
        p.add_argument("--video", default=None, metavar="PATH",
                       help="a video clip (needs PyAV: " + INSTALL_HINT + "); its sampled frames become "
                            "<|image_k|> after any --image files")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--frames", type=int, default=None, metavar="N",
                   help=f"sample N frames evenly over the clip (default {DEFAULT_FRAMES}); num_crops 4 suits "
                        "multi-frame input")
    g.add_argument("--fps", type=float, default=None, metavar="F", help="sample F frames per second of the clip")


def timestamps_json(req: VideoRequest) -> dict:
    """What --json reports about a clip: image number, timestamp (s) of each frame; the clip's size/duration."""
    first = len(req.images) - len(req.timestamps) + 1
    return {"frames": [{"image": first + i, "timestamp": t} for i, t in enumerate(req.timestamps)],
            "width": req.info.width, "height": req.info.height, "duration": round(req.info.duration, 6),
            "tokens_per_frame": req.tokens_per_frame}


def describe_timestamps(timestamps: Sequence[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in timestamps) + " s"


def cli_video_request(rt, args, images: Sequence = ()) -> VideoRequest:
    """`generate --video`: the clip of args.video sampled by --frames / --fps at --num-crops, budget-checked
    against --max-length and --max-new-tokens, after the --image files; one line about the frames on stderr."""
    import sys  # noqa: PLC0415

    req = video_request(rt.processor, args.video, args.prompt, frames=args.frames, fps=args.fps,
                        num_crops=args.num_crops, max_length=rt.max_length, max_new_tokens=args.max_new_tokens,
                        system=args.system, images=images)
    print(f"(video {args.video}: {len(req.timestamps)} frames at {describe_timestamps(req.timestamps)}, "
          f"{req.tokens_per_frame} tokens each)", file=sys.stderr)
    return req


def chat_video(rt, path: str, args) -> list:
    """`/video PATH` in chat: the clip's frames for the next message (sampled by the chat's --frames / --fps,
    budget-checked for the frames alone), or [] after printing why not. The chat goes on either way."""
    import sys  # noqa: PLC0415

    path = os.path.expanduser(path.strip())
    if not path:
        print("error: /video needs a path", file=sys.stderr)
        return []
    try:
        req = video_request(rt.processor, path, "", frames=args.frames, fps=args.fps, num_crops=args.num_crops,
                            max_length=rt.max_length, max_new_tokens=args.max_new_tokens)
    except InputError as e:
        print(f"error: {e}: the video was not added", file=sys.stderr)
        return []
    print(f"(video {path}: {len(req.frames)} frames at {describe_timestamps(req.timestamps)} attached to your next "
          "message)", file=sys.stderr)
    return list(req.frames)


def check_cli_video(args) -> None:
    """`generate --video`: the cheap checks (sampling values, the file exists), before the bundle loads."""
    check_sampling(args.frames, args.fps)
    if not os.path.isfile(os.fspath(args.video)):
        raise VideoError(f"cannot read video {args.video!r}: no such file")
