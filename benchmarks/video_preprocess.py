"""Preprocessing time per video frame: the per-image HD transform against the batched one, plus clip decoding.

    python -m phi3v_edge.benchmarks.video_preprocess [--frames 8] [--repeats 7] [--sizes 640x360:4,1280x720:4]

For each frame size and num_crops: N frames of one clip (random pixels: the transform does not depend on
them) through image_transform.preprocess_images ("before": one image at a time) and
frames.preprocess_same_size ("after": one geometry, one padded canvas, in-place normalisation, strided
bicubic), checked identical, timed as the median wall and process CPU time of `repeats` runs, in ms per
frame. Then the clip side: a 10 s mpeg4 clip of that size written with PyAV, and video.video_frames(frames=N)
timed (probe + sampling + decoding, ms per sampled frame), with keyframe seeks and front to back. Prints a
Markdown table with the device and the machine's load average before and after (other work on a shared
machine shows there). Never part of the tests.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from phi3v_edge.runtime import frames as F
from phi3v_edge.runtime import image_transform as T
from phi3v_edge.runtime import video as V

DEFAULT_SIZES = "640x360:4,1280x720:4,1920x1080:4,1280x720:16"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall, median process CPU) seconds of fn() over `repeats` runs, after one warm-up run.

    On a shared machine the wall time includes waiting for a core; the process CPU time (all its threads)
    does not, and for the single-threaded transform it is what the wall time is on a quiet machine."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def write_clip(path: str, w: int, h: int, seconds: float = 10.0, rate: int = 30) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for i in range(int(seconds * rate)):
            a = np.roll(base, 4 * i, axis=1)  # moving content: real inter frames
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def run(sizes: list[tuple[int, int, int]], n: int, repeats: int, decode: bool) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for w, h, crops in sizes:
        frames = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]
        a, b = T.preprocess_images(frames, crops), F.preprocess_same_size(frames, crops)
        same = bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2])
        before = timed(lambda fr=frames, k=crops: T.preprocess_images(fr, k), repeats)
        after = timed(lambda fr=frames, k=crops: F.preprocess_same_size(fr, k), repeats)
        one = timed(lambda fr=frames[:1], k=crops: F.preprocess_same_size(fr, k), repeats)  # N=1: the per-op gains
        row = dict(size=f"{w}x{h}", crops=crops, hd=f"{b[1][0][1]}x{b[1][0][0]}", tokens=b[2][0], same=same,
                   before=before, after=after, single=(one[0] * n, one[1] * n))
        if decode:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "clip.mp4")
                write_clip(path, w, h)
                row["decode"] = timed(lambda p=path: V.video_frames(p, frames=n), max(1, repeats // 2))
                V.SEEKING = False
                try:
                    row["decode_all"] = timed(lambda p=path: V.video_frames(p, frames=n), max(1, repeats // 2))
                finally:
                    V.SEEKING = True
        rows.append(row)
    return rows


def table(rows: list[dict], n: int) -> str:
    ms = lambda t: f"{t[0] / n * 1e3:.1f} ({t[1] / n * 1e3:.1f})"  # noqa: E731  wall (cpu) ms per frame
    out = [f"| frame | num_crops | HD size | tokens/frame | per image | batched | speed-up (cpu) | batched, N=1 | "
           f"identical | decode {n} of 300, seeking | decode {n} of 300, front to back |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['size']} | {r['crops']} | {r['hd']} | {r['tokens']} | {ms(r['before'])} | {ms(r['after'])} | "
                   f"{r['before'][1] / r['after'][1]:.2f}x | {ms(r['single'])} | {'yes' if r['same'] else 'NO'} | "
                   f"{ms(r['decode']) if 'decode' in r else '-'} | {ms(r['decode_all']) if 'decode' in r else '-'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi3v_edge.benchmarks.video_preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=8, metavar="N", help="frames per clip (default 8)")
    p.add_argument("--repeats", type=int, default=7, metavar="R", help="timed runs per case (default 7)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, metavar="WxH:K,...", help=f"default {DEFAULT_SIZES}")
    p.add_argument("--no-decode", action="store_true", help="skip the clip decoding column (no PyAV needed)")
    args = p.parse_args(argv)
    sizes = []
    for item in args.sizes.split(","):
        wh, _, k = item.partition(":")
        w, _, h = wh.partition("x")
        sizes.append((int(w), int(h), int(k or T.DEFAULT_NUM_CROPS)))
    load0 = os.getloadavg()
    t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = run(sizes, args.frames, args.repeats, not args.no_decode)
    load1 = os.getloadavg()
    print(f"device: {cpu_model()}, {os.cpu_count()} logical CPUs; numpy {np.__version__}, Pillow "
          f"{Image.__version__}; {t0}")
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python -m phi3v_edge.benchmarks.video_preprocess {shown}")
    print(f"load average (1/5/15 min) before {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, after "
          f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}")
    print(f"{args.frames} frames per clip; ms per frame, median wall (median process CPU) of {args.repeats} runs "
          "(decoding: of half as many)\n")
    print(table(rows, args.frames))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
