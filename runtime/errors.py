"""The runtime's error types. Each names what was wrong and what to do; the runtime stays usable after any of them."""
from __future__ import annotations

from .bundle import BundleError  # a bundle that is missing, corrupt, or from an unknown format version


class ProviderError(RuntimeError):
    """The requested execution provider is not usable (e.g. provider="cuda" without onnxruntime-gpu or a GPU).

    Never answered by a silent fallback to the CPU."""


class InputError(ValueError):
    """A bad request: unreadable or oversized image, placeholders that do not match the images, a prompt
    plus max_new_tokens longer than max_length, bad sampling settings, ..."""


class RequestCancelled(RuntimeError):
    """The request was cancelled (by its caller, or because the engine shut down) before it finished."""


class EngineBusy(RuntimeError):
    """The engine's waiting queue is full: retry later (an HTTP server answers 429/503 with Retry-After)."""


class EngineClosed(RuntimeError):
    """The engine was shut down (or its loop died); it takes no new requests."""


__all__ = ["BundleError", "ProviderError", "InputError", "RequestCancelled", "EngineBusy", "EngineClosed"]
