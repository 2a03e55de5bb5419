"""ONNX Runtime sessions for the bundle's graphs: provider choice (never a silent CPU fallback) and session options.

    provider "auto" -> "cuda" when the CUDA provider is present AND usable here, else "cpu" (`resolve_provider`:
                       the one rule for the API, the CLI and export's --target)
    provider "cpu"  -> CPUExecutionProvider
    provider "cuda" -> CUDAExecutionProvider (onnxruntime-gpu); optionally with CUDA graphs enabled
                       (the provider option `enable_cuda_graph`; runs then pick a graph with the run
                       option `gpu_graph_id`, -1 = run without a graph)
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BundleError, ProviderError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", "cuda", "cpu")
GPU_GRAPH_ID = "gpu_graph_id"  # run config key: which captured CUDA graph a run uses (-1: none)
log = logging.getLogger("phi3v_edge")


def resolve_provider(provider: str = "auto") -> str:
    """'auto' -> 'cuda' when this onnxruntime has the CUDA provider and it initialises on this machine (a
    one-node probe session), else 'cpu'; the choice is logged. 'cuda' / 'cpu' are checked by `check_provider`
    and returned as they are: an explicit 'cuda' that cannot work raises ProviderError, never a CPU fallback."""
    if provider == "auto":
        chosen = "cuda" if cuda_usable() else "cpu"
        log.info("provider auto -> %s (%s)", chosen, "CUDA provider usable" if chosen == "cuda" else
                 "no usable CUDA provider in onnxruntime " + ort.__version__)
        return chosen
    check_provider(provider)
    return provider


@lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """Whether ONNX Runtime's CUDA provider is present and actually initialises (probed once per process)."""
    if PROVIDERS["cuda"] not in ort.get_available_providers():
        return False
    _preload_cuda_libraries()
    so = session_options()
    so.log_severity_level = 4  # the probe's fallback warning is expected on machines without a GPU
    try:
        sess = ort.InferenceSession(_probe_model(), sess_options=so,
                                    providers=[PROVIDERS["cuda"], PROVIDERS["cpu"]])
    except Exception:
        return False
    return sess.get_providers()[0] == PROVIDERS["cuda"]


def _probe_model() -> bytes:
    """A serialized ONNX model with one Identity node (float [1] -> [1]), written without the onnx package."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    def field(num: int, payload: bytes | int) -> bytes:
        if isinstance(payload, int):
            return varint(num << 3) + varint(payload)  # wire type 0
        return varint(num << 3 | 2) + varint(len(payload)) + payload  # wire type 2

    def value_info(name: str) -> bytes:  # float tensor of shape [1]
        shape = field(2, field(1, field(1, 1)))  # TensorShapeProto{dim{dim_value 1}}
        return field(1, name.encode()) + field(2, field(1, field(1, 1) + shape))

    node = field(1, b"x") + field(2, b"y") + field(4, b"Identity")
    graph = field(1, node) + field(2, b"probe") + field(11, value_info("x")) + field(12, value_info("y"))
    return field(1, 8) + field(7, graph) + field(8, field(2, 13))  # ir_version 8, graph, opset 13


def check_provider(provider: str) -> str:
    """'cpu' | 'cuda' -> the ONNX Runtime provider name; ProviderError if this onnxruntime lacks it."""
    if provider not in PROVIDERS:
        raise ProviderError(f"provider {provider!r} is not supported: use 'auto', 'cuda' or 'cpu'")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise ProviderError(
            f"provider='{provider}' needs ONNX Runtime's {name}, but the installed onnxruntime {ort.__version__} "
            f"({_ort_flavour()}) offers only {', '.join(available)}. Install the GPU build instead "
            "(pip uninstall onnxruntime && pip install 'phi3v-edge[gpu]', i.e. onnxruntime-gpu with the CUDA and "
            "cuDNN versions it was built for) on a machine with an NVIDIA GPU, or pass provider='cpu' (--provider cpu)")
    return name


def _ort_flavour() -> str:
    try:
        from importlib import metadata

        for dist in ("onnxruntime-gpu", "onnxruntime"):
            try:
                return f"{dist} {metadata.version(dist)}"
            except metadata.PackageNotFoundError:
                continue
    except Exception:  # pragma: no cover - metadata trouble is not worth failing over
        pass
    return "unknown package"


def device_of(provider: str) -> str:
    """OrtValue device type for buffers used with this provider."""
    return "cuda" if provider == "cuda" else "cpu"


def session_options(threads: int | None = None, log_level: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    from .threads import default_threads  # threads, else $PHI3V_EDGE_THREADS, else physical cores

    so.intra_op_num_threads = default_threads(threads)
    # errors only unless PHI3V_EDGE_ORT_LOG says otherwise (0 verbose .. 4 fatal)
    so.log_severity_level = int(os.environ.get("PHI3V_EDGE_ORT_LOG", 3 if log_level is None else log_level))
    return so


def create_session(model: str | Path | bytes, provider: str = "cpu", *, device_id: int = 0,
                   cuda_graph: bool = False, threads: int | None = None,
                   what: str | None = None) -> ort.InferenceSession:
    """An InferenceSession on exactly the requested provider.

    provider="cuda" raises ProviderError when the CUDA provider is missing from this onnxruntime, or when it
    is present but could not be initialised (ONNX Runtime would otherwise quietly run on the CPU).
    cuda_graph=True enables CUDA graph capture (CUDA only): every run must then use IOBinding with fixed
    buffer addresses, and runs choose a graph with the run option `gpu_graph_id`.
    Files that cannot be loaded raise BundleError."""
    name = check_provider(provider)
    if cuda_graph and provider != "cuda":
        raise ProviderError("CUDA graphs need provider='cuda'")
    what = what or (Path(model).name if not isinstance(model, (bytes, bytearray)) else "in-memory graph")
    if provider == "cuda":
        _preload_cuda_libraries()
        # use_tf32 0: fp32 graphs stay fp32 (the parity bundles); fp16/int4 graphs are unaffected
        opts = {"device_id": str(int(device_id)), "enable_cuda_graph": "1" if cuda_graph else "0",
                "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
        providers = [(name, opts), "CPUExecutionProvider"]
    else:
        providers = [name]
    so = session_options(threads)
    src = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/NoSuchFile/... types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if provider == "cuda" and ("cuda" in msg.lower() or "graph" in msg.lower()):
            hint = " (CUDA graphs need every node of the graph on the CUDA provider; try cuda_graph=False)" \
                if cuda_graph else ""
            raise ProviderError(f"could not create a CUDA session for {what}: {msg}{hint}") from None
        raise BundleError(f"cannot load {what}: {msg} (the file may be corrupt or truncated: "
                          "check the bundle with `phi3v-edge verify BUNDLE`, or re-export it)") from None
    if provider == "cuda" and sess.get_providers()[0] != name:
        raise ProviderError(
            f"onnxruntime has the {name} but could not initialise it for {what} (it would have run on "
            f"{sess.get_providers()[0]} instead): usually the CUDA / cuDNN libraries this onnxruntime-gpu was built for are not on the "
            "library path or no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES; set "
            "PHI3V_EDGE_ORT_LOG=2 to see ONNX Runtime's reason). Pass provider='cpu' to run on the CPU.")
    return sess


_preloaded = False


def _preload_cuda_libraries() -> None:
    """Load the CUDA / cuDNN libraries from the nvidia-* wheels (as a CUDA torch install brings them), so
    the CUDA provider finds them without `import torch` first; harmless where they are on the library path."""
    global _preloaded
    if not _preloaded and hasattr(ort, "preload_dlls"):
        _preloaded = True
        try:
            ort.preload_dlls()
        except Exception:  # the provider's own error, raised below, is the one worth showing
            pass


def numpy_dtype(ort_type: str):
    """'tensor(float16)' -> np.float16, etc."""
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
             "tensor(bfloat16)": None}
    if ort_type not in table or table[ort_type] is None:
        raise BundleError(f"unsupported tensor type {ort_type} in the bundle's graph")
    return table[ort_type]


def run_options(graph_id: int | None = None) -> ort.RunOptions:
    ro = ort.RunOptions()
    if graph_id is not None:
        ro.add_run_config_entry(GPU_GRAPH_ID, str(int(graph_id)))
    return ro
