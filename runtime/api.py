"""Phi3VRuntime: the simple single-user API (generate / stream / chat / score) as a front over one Engine.

    rt = Phi3VRuntime("bundle/")                       # provider "auto": CUDA when usable, else CPU
    print(rt.generate(prompt, images=["cat.jpg"]).text)
    for delta in rt.stream(prompt): ...

Safe to call from several threads: every call is a request of the engine (runtime/engine.py), which batches
concurrent ones into shared decode steps; nothing here holds state between requests except `last_result`.
The KV cache keeps conversations: `chat` (and `generate`/`stream` with keep_cache=True) let a request reuse the
cached KV of a prompt it extends, so a follow-up turn prefills only its new tokens.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import bundle as fmt
from .chat_template import build_prompt
from .engine import Engine
from .errors import BundleError, InputError, ProviderError, RequestCancelled
from .image_transform import DEFAULT_MAX_PIXELS
from .request import GenerationResult, RequestHandle


class Phi3VRuntime:
    """Load a bundle and generate.

    provider: "auto" (default: cuda when usable, else cpu; `self.provider` says which), "cuda" (onnxruntime-gpu;
              decode steps replay CUDA graphs unless cuda_graph=False) or "cpu".
    max_length: KV cache rows per slot (prompt + generated tokens), allocated once.
    max_batch: KV slots, i.e. requests decoded together (concurrent calls from several threads share steps).
    long_rope: "auto" (short factors up to original_max_position_embeddings, one recompute at the crossing)
               or "always" (long factors from the first token, never a recompute).
    """

    def __init__(self, bundle_dir: str | os.PathLike, provider: str = "auto", max_length: int = 4096,
                 long_rope: str = "auto", *, max_batch: int = 1, max_queue: int = 64, device_id: int = 0,
                 cuda_graph: bool | None = None, threads: int | None = None, verify: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.engine = Engine(bundle_dir, provider, max_batch, max_length, max_queue, long_rope, device_id=device_id,
                             cuda_graph=cuda_graph, threads=threads, verify=verify, max_pixels=max_pixels)
        e = self.engine
        self.bundle_dir, self.manifest, self.rope = e.bundle_dir, e.manifest, e.rope
        self.provider, self.long_rope, self.max_length, self.max_batch = e.provider, e.long_rope, max_length, max_batch
        self.cuda_graph = e.cuda_graph
        self.processor, self.tokenizer, self.default_stop_ids = e.processor, e.tokenizer, e.default_stop_ids
        self.decoder, self.vision = e.decoder, e.vision
        self.last_result: GenerationResult | None = None
        self.last_video = None  # video.VideoRequest of the last request with video= (frame timestamps)

    # ---- public API ----------------------------------------------------------------------------
    def generate(self, prompt: str, images=None, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: str | int | Sequence[str | int] | None = None,
                 num_crops: int | None = None, stop_ids: Iterable[int] | None = None,
                 keep_cache: bool = False, *, video=None, video_frames: int | None = None,
                 video_fps: float | None = None) -> GenerationResult:
        """Generate a reply to `prompt` (the full model prompt, e.g. from `build_prompt`; image k appears as
        <|image_k|>). stop: extra stop strings (cut from the text) and/or stop ids; stop_ids: replaces the
        bundle's stop ids (() disables them). keep_cache: may reuse the cached KV of a prompt this one extends
        (default: prefill the whole prompt). video: a clip (path or bytes) sampled to video_frames frames
        evenly (default 4) or at video_fps; its frames follow `images`, in place of <|video|> or at the start
        of the last user turn (runtime/video.py prompt_video); their timestamps are the result's
        `frame_timestamps`."""
        prompt, images, stamps = self._with_video(prompt, images, video, video_frames, video_fps, num_crops,
                                                  max_new_tokens)
        h = self._submit(prompt, images, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
                         seed, stop, num_crops, stop_ids, keep_cache)
        self.last_result = _stamped(h.result(), stamps)
        return self.last_result

    def stream(self, prompt: str, images=None, max_new_tokens: int = 256, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop=None, num_crops: int | None = None,
               stop_ids: Iterable[int] | None = None, keep_cache: bool = False, *, video=None,
               video_frames: int | None = None, video_fps: float | None = None) -> Iterator[str]:
        """Like `generate`, yielding text deltas as tokens arrive (joined, they equal the result's text);
        the generator returns the GenerationResult (also left in `last_result`). Closing it early cancels the
        request. Input errors are raised here, before the generator is returned."""
        prompt, images, stamps = self._with_video(prompt, images, video, video_frames, video_fps, num_crops,
                                                  max_new_tokens)
        h = self._submit(prompt, images, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
                         seed, stop, num_crops, stop_ids, keep_cache)
        return self._deltas(h, stamps)

    def chat(self, messages: Sequence[dict[str, Any]], **kwargs) -> GenerationResult:
        """One turn of a conversation: messages = the whole history [{"role", "content", "images"?}, ...],
        ending with the user's turn. A follow-up turn prefills only the tokens that do not extend the cached
        prefix. Same keyword arguments as `generate`."""
        prompt, images = self._template(messages)
        kwargs.setdefault("keep_cache", True)
        return self.generate(prompt, images, **kwargs)

    def chat_stream(self, messages: Sequence[dict[str, Any]], **kwargs) -> Iterator[str]:
        """`chat`, streaming text deltas."""
        prompt, images = self._template(messages)
        kwargs.setdefault("keep_cache", True)
        return self.stream(prompt, images, **kwargs)

    def score(self, prompt: str, images=None, continuation: Sequence[int] = (), num_crops: int | None = None) -> np.ndarray:
        """Teacher-forced next-token logits: row 0 after the prompt, row i after continuation[:i].
        Returns float32 [len(continuation) + 1, vocab] (evaluation: KL divergence, perplexity)."""
        return self.engine.score(prompt, images, continuation, num_crops)

    def reset(self) -> None:
        """Forget cached conversations (KV prefixes and image features; nothing is freed or reallocated)."""
        self.engine.forget()

    def count_tokens(self, prompt: str, images=None, num_crops: int | None = None) -> int:
        """Prompt length in tokens (image placeholders included), without running any graph."""
        return self.engine.count_tokens(prompt, images, num_crops)

    def verify(self, progress=None) -> list[str]:
        """sha256 of every bundle file against the manifest: the list of problems (empty when fine)."""
        return fmt.verify_bundle(self.bundle_dir, progress)

    def stats(self) -> dict:
        """The engine's state and counters (running, waiting, prefills, prefix_tokens_reused, ...)."""
        return self.engine.stats()

    def close(self) -> None:
        self.engine.shutdown(drain_timeout=0.0)

    @staticmethod
    def build_prompt(messages) -> tuple[str, list]:
        return build_prompt(messages)

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _template(messages) -> tuple[str, list]:
        try:
            return build_prompt(messages)
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(str(e)) from None

    def _with_video(self, prompt, images, video, frames, fps, num_crops, max_new_tokens):
        """(prompt, images, frame timestamps) with a clip's frames added (budget-checked before decoding);
        unchanged, with None, without one."""
        if video is None:
            if frames is not None or fps is not None:
                raise InputError("video_frames / video_fps need video=")
            return prompt, images, None
        from .video import prompt_video

        req = prompt_video(self.processor, prompt, images, video, frames=frames, fps=fps, num_crops=num_crops,
                           max_length=self.max_length, max_new_tokens=max_new_tokens)
        self.last_video = req  # kept for callers of earlier versions; not meaningful across threads
        return req.prompt, req.images, list(req.timestamps)

    def _submit(self, prompt, images, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed,
                stop, num_crops, stop_ids, keep_cache) -> RequestHandle:
        return self.engine.submit(prompt, images, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed, stop=stop, stop_ids=stop_ids,
                                  num_crops=num_crops, reuse_prefix=keep_cache)

    def _deltas(self, h: RequestHandle, stamps: list[float] | None = None) -> Iterator[str]:
        try:
            for d in h:
                if d.text:
                    yield d.text
            self.last_result = _stamped(h.result(), stamps)
            return self.last_result
        finally:
            if not h.done:
                h.cancel()


def _stamped(result: GenerationResult, stamps: list[float] | None) -> GenerationResult:
    """The result with its video frames' timestamps (each request carries its own: safe across threads)."""
    if stamps is not None:
        result.frame_timestamps = stamps
    return result


__all__ = ["Phi3VRuntime", "GenerationResult", "BundleError", "InputError", "ProviderError", "RequestCancelled"]
