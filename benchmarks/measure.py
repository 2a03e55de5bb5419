"""Measurement primitives shared by the benchmark systems: GPU memory (NVML), copy bandwidth, medians,
bytes a decode step must read."""
from __future__ import annotations

import ctypes
import os
import resource
import statistics
import threading
import time
from pathlib import Path


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class GpuMemorySampler:
    """Peak device memory in use while this process runs, through NVML (libnvidia-ml, no Python package).

    Device-wide `used` minus the value before this process made a CUDA context; each benchmark system
    runs alone in its own process, so that difference is the process's footprint (context included).
    Unavailable (no NVML): `peak_gib` is None."""

    def __init__(self, device_index: int = 0, period_s: float = 0.01):
        self.period, self.peak, self.base, self._stop = period_s, 0, None, threading.Event()
        try:
            self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if self.nvml.nvmlInit_v2() != 0:
                raise OSError("nvmlInit failed")
            self.handle = ctypes.c_void_p()
            if self.nvml.nvmlDeviceGetHandleByIndex_v2(device_index, ctypes.byref(self.handle)) != 0:
                raise OSError("no device")
            self.base = self._used()
        except OSError:
            self.nvml = None

    def _used(self) -> int:
        m = _NvmlMemory()
        self.nvml.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(m))
        return m.used

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(self.period)

    def __enter__(self):
        if self.nvml is not None:
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.nvml is not None:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self._used())

    @property
    def peak_gib(self) -> float | None:
        return None if self.nvml is None else round((self.peak - self.base) / 2 ** 30, 3)


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)


def mem_available_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), GiB; None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured device-memory copy bandwidth: (bytes read + bytes written) / time, GB/s."""
    if device == "cuda":
        import torch

        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        dst.copy_(src)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        secs = a.elapsed_time(b) / 1e3
    else:
        import numpy as np

        nbytes = min(nbytes, 1 << 28)
        src = np.ones(nbytes, np.uint8)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        t = time.perf_counter()
        for _ in range(reps):
            np.copyto(dst, src)
        secs = time.perf_counter() - t
    return round(2 * nbytes * reps / secs / 1e9, 1)


def read_bandwidth_gbps(threads: int | None = None, nbytes: int = 1 << 29, reps: int = 5) -> float:
    """Measured CPU memory read bandwidth with `threads` threads (default: physical cores, as the sessions run),
    GB/s: each thread OR-reduces its share of a buffer far larger than the caches (NumPy releases the GIL
    inside the reduction), best of `reps`. A decode step streams its weights once, so step bytes / this is
    the step's floor; achieved GB/s over it says how close a kernel comes."""
    import threading

    import numpy as np

    from phi3v_edge.runtime.threads import default_threads

    n = max(1, default_threads(threads))
    buf = np.ones(nbytes // 8, np.int64)
    parts = np.array_split(buf, n)
    best = 0.0
    for _ in range(reps):
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(part,)) for part in parts]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, buf.nbytes / (time.perf_counter() - t) / 1e9)
    return round(best, 1)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def decoder_bytes_per_step(weight_bytes: int, layers: int, kv_heads: int, head_dim: int, context: int,
                           kv_itemsize: int) -> int:
    """Bytes one decode step reads at least: every weight once (the embedding table excluded: one row
    is gathered) plus the K and V of every cached position of every layer."""
    return weight_bytes + 2 * layers * kv_heads * head_dim * context * kv_itemsize


def bundle_decoder_weight_bytes(bundle: Path, manifest: dict) -> int:
    """Decoder weight bytes of a bundle less the embedding table (gathered, not streamed)."""
    dec = manifest["decoder"]
    files = [f for f in manifest["files"] if f.startswith("decoder")]
    total = sum(manifest["files"][f]["bytes"] for f in files)
    emb_prec = dec.get("embedding_precision", "fp16")
    itemsize = {"fp32": 4, "fp16": 2, "int8": 1}.get(emb_prec, 2)
    return total - dec["vocab_size"] * dec["hidden_size"] * itemsize


def env_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "torch", "transformers",
                "bitsandbytes", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["python"] = ".".join(map(str, os.sys.version_info[:3]))
    return out
