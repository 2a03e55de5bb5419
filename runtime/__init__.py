"""phi3v_edge.runtime: run a phi3v-edge bundle on ONNX Runtime (no torch, no transformers).

    from phi3v_edge.runtime import Phi3VRuntime
    rt = Phi3VRuntime("bundle/", provider="cuda")
    print(rt.generate("<|user|>\\n<|image_1|>\\nWhat is this?<|end|>\\n<|assistant|>\\n", ["cat.jpg"]).text)
"""
from .bundle import BundleError
from .errors import InputError, ProviderError, RequestCancelled

__all__ = ["Phi3VRuntime", "Engine", "GenerationResult", "BundleError", "InputError", "ProviderError", "RequestCancelled"]


def __getattr__(name):  # the engine pulls in onnxruntime: loaded on first use, so `import phi3v_edge.runtime` stays light
    if name == "Phi3VRuntime":
        from .api import Phi3VRuntime

        return Phi3VRuntime
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "GenerationResult":
        from .request import GenerationResult

        return GenerationResult
    raise AttributeError(f"module 'phi3v_edge.runtime' has no attribute {name!r}")
