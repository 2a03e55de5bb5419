"""Phi3VRuntime: a bundle on ONNX Runtime, with generate / stream / chat. Torch-free.

One request at a time per runtime:

    prompt + images -> processor (HD transform, chat-template tokens with -k image placeholders)
                    -> vision.onnx over the valid crops of the images not already seen -> features [T, hidden]
                    -> decoder prefill of the tokens not already in the KV cache
                    -> one decode step per token (on-device ArgMax when greedy) until a stop id / stop string
                       / max_new_tokens

The KV cache keeps the conversation: `chat` (and `stream`/`generate` with `keep_cache`) reuse the longest
common prefix of the cached tokens and the new prompt, so a follow-up turn prefills only its new tokens.
LongRoPE: the short cos/sin tables while the total length is <= original_max_position_embeddings; the step
that crosses it re-runs prefill over the whole sequence (image rows included) with the long tables, once,
which is what the PyTorch reference does (`long_rope="always"` uses the long tables from the start).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import bundle as fmt
from .chat_template import build_prompt
from .decode import Decoder, Vision
from .errors import BundleError, InputError, ProviderError, RequestCancelled
from .image_layout import layout_index, valid_crops
from .image_transform import DEFAULT_MAX_PIXELS, check_num_crops, preprocess_images
from .processor import Phi3VProcessor, check_placeholders, image_list
from .rope import needs_long
from .sampler import Sampler, SamplingParams
from .session import resolve_provider
from .tokenizer import StreamDecoder

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only (a stop id, if hit, is the last one)
    text: str  # their text (special tokens skipped; cut before a stop string, if one was hit)
    finish_reason: str  # "stop" (stop id or stop string) or "length" (max_new_tokens reached)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: preprocess, vision, prefill, decode, ...
    prompt_tokens: int = 0  # length of the prompt (image placeholder tokens included)
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache (not prefilled again)


@dataclass
class _Image:
    fingerprint: tuple
    num_crops: int
    num_tokens: int
    features: np.ndarray  # [num_tokens, hidden]


@dataclass
class _Prepared:
    ids: np.ndarray  # [L] int64, -k at image k's positions
    features: np.ndarray | None  # [count of negative ids, hidden] in position order
    images: list[_Image]
    reuse: int  # leading tokens whose cached KV may be kept
    timings: dict[str, float]


class Phi3VRuntime:
    """Load a bundle and generate.

    provider: "auto" (default: cuda when usable, else cpu; `self.provider` says which), "cuda" (onnxruntime-gpu;
              decode steps replay a CUDA graph unless cuda_graph=False) or "cpu".
    max_length: KV cache rows (prompt + generated tokens), allocated once.
    long_rope: "auto" (short factors up to original_max_position_embeddings, one recompute at the crossing)
               or "always" (long factors from the first token, never a recompute).
    """

    def __init__(self, bundle_dir: str | os.PathLike, provider: str = "auto", max_length: int = 4096,
                 long_rope: str = "auto", *, device_id: int = 0, cuda_graph: bool | None = None,
                 threads: int | None = None, verify: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.bundle_dir = Path(bundle_dir)
        provider = resolve_provider(provider)  # before any file work: "cuda" without CUDA fails right here
        if long_rope not in ("auto", "always"):
            raise ValueError(f"long_rope must be 'auto' or 'always', got {long_rope!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.manifest = fmt.load_manifest(self.bundle_dir)
        if verify:
            problems = fmt.verify_bundle(self.bundle_dir)
            if problems:
                raise BundleError(f"bundle {self.bundle_dir} failed verification: " + "; ".join(problems))
        self.rope = self.manifest["rope"]
        limit = self.rope.get("max_position_embeddings")
        if limit and max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings {limit}")
        self.provider, self.long_rope, self.max_length = provider, long_rope, max_length
        cuda_graph = (provider == "cuda") if cuda_graph is None else bool(cuda_graph)
        try:
            self.processor = Phi3VProcessor.from_pretrained(self.bundle_dir, max_pixels=max_pixels)
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {self.bundle_dir}: cannot load the tokenizer/processor files: {e}") from None
        self.tokenizer = self.processor.tokenizer
        self.default_stop_ids = tuple(int(i) for i in self.manifest["tokens"].get("stop_ids", self.tokenizer.stop_ids))
        for name in (fmt.DECODER_FILE, fmt.VISION_FILE):
            if not (self.bundle_dir / name).is_file():
                raise BundleError(f"bundle {self.bundle_dir} is missing {name}")
        dec_info = self.manifest.get("decoder") or {}
        self.decoder = Decoder(self.bundle_dir / fmt.DECODER_FILE, self.rope, max_length, provider,
                               device_id=device_id, cuda_graph=cuda_graph, threads=threads,
                               all_logits=bool(dec_info.get("all_logits", False)))
        self.vision = Vision(self.bundle_dir / fmt.VISION_FILE, provider, device_id=device_id, threads=threads)
        self.cuda_graph = cuda_graph
        # conversation state: the tokens whose KV is in the cache, their image rows, the images seen
        self._tokens: list[int] = []
        self._features: np.ndarray | None = None
        self._images: list[_Image] = []
        self._active = 0  # id of the request that owns the runtime (0: none)
        self._next_id = 0
        self.last_result: GenerationResult | None = None

    # ---- public API ----------------------------------------------------------------------------
    def generate(self, prompt: str, images=None, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: str | int | Sequence[str | int] | None = None,
                 num_crops: int | None = None, stop_ids: Iterable[int] | None = None,
                 keep_cache: bool = False) -> GenerationResult:
        """Generate a reply to `prompt` (the full model prompt, e.g. from `build_prompt`; image k appears as
        <|image_k|>). stop: extra stop strings (cut from the text) and/or stop ids; stop_ids: replaces the
        bundle's stop ids (() disables them). keep_cache: reuse the KV of a common prefix with the previous
        request (default: start from an empty cache)."""
        gen = self._request(prompt, images, num_crops, keep_cache, max_new_tokens,
                            SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed),
                            stop, stop_ids, stream=False)
        for _ in gen:
            pass
        return self.last_result

    def stream(self, prompt: str, images=None, max_new_tokens: int = 256, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop=None, num_crops: int | None = None,
               stop_ids: Iterable[int] | None = None, keep_cache: bool = False) -> Iterator[str]:
        """Like `generate`, yielding text deltas as tokens arrive (joined, they equal the result's text);
        the generator returns the GenerationResult (also left in `last_result`). Closing it early ends the
        request. Input errors are raised here, before the generator is returned."""
        return self._request(prompt, images, num_crops, keep_cache, max_new_tokens,
                             SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed),
                             stop, stop_ids, stream=True)

    def chat(self, messages: Sequence[dict[str, Any]], **kwargs) -> GenerationResult:
        """One turn of a conversation: messages = the whole history [{"role", "content", "images"?}, ...],
        ending with the user's turn. The KV cache of the conversation is kept: a follow-up turn prefills only
        the tokens that do not extend the cached prefix. Same keyword arguments as `generate`."""
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
        prep = self._prepare(prompt, images, num_crops, keep_cache=False)
        n = prep.ids.size + len(continuation)
        if n > self.max_length:
            raise InputError(f"the prompt ({prep.ids.size} tokens) plus the continuation ({len(continuation)}) "
                             f"exceeds max_length {self.max_length}")
        self._next_id += 1
        self._active = 0  # no request owns the runtime afterwards
        self._prefill(prep.ids, prep.features, reuse=0)
        self._images = prep.images
        rows = [self.decoder.logits_numpy().astype(np.float32)]
        for tok in continuation:
            self._advance(int(tok), from_device=False)
            rows.append(self.decoder.logits_numpy().astype(np.float32))
        return np.stack(rows)

    def reset(self) -> None:
        """Forget the conversation (the KV cache is emptied; nothing is freed or reallocated)."""
        self._forget()

    def count_tokens(self, prompt: str, images=None, num_crops: int | None = None) -> int:
        """Prompt length in tokens (image placeholders included), without running any graph."""
        return self._prepare(prompt, images, num_crops, keep_cache=False, run_vision=False).ids.size

    def verify(self, progress=None) -> list[str]:
        """sha256 of every bundle file against the manifest: the list of problems (empty when fine)."""
        return fmt.verify_bundle(self.bundle_dir, progress)

    @property
    def cache_length(self) -> int:
        return self.decoder.cache.length

    @staticmethod
    def build_prompt(messages) -> tuple[str, list]:
        return build_prompt(messages)

    # ---- request preparation -------------------------------------------------------------------
    @staticmethod
    def _template(messages) -> tuple[str, list]:
        try:
            return build_prompt(messages)
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(str(e)) from None

    def _prepare(self, prompt: str, images, num_crops, keep_cache: bool, run_vision: bool = True) -> _Prepared:
        t0 = time.perf_counter()
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
        try:
            images = _image_list(images)
            crops = self.processor.num_crops if num_crops is None else check_num_crops(num_crops)
            check_placeholders(prompt, len(images))  # cheap checks before any image work
            prints = [_fingerprint(im) for im in images]
            # images already seen in this conversation (same content, same crops) keep their features
            same = 0
            if keep_cache:
                while (same < min(len(prints), len(self._images)) and self._images[same].fingerprint == prints[same]
                       and self._images[same].num_crops == crops):
                    same += 1
            new = images[same:]
            pv, sizes, ntok = (preprocess_images(new, crops, self.processor.image_mean, self.processor.image_std,
                                                 self.processor.max_pixels) if new else (None, None, []))
            num_tokens = [im.num_tokens for im in self._images[:same]] + list(ntok)
            ids = self.processor.tokenize(prompt, num_tokens)[0]
        except InputError:
            raise
        except (ValueError, TypeError, OSError) as e:  # ImageError is a ValueError
            raise InputError(str(e)) from None
        t1 = time.perf_counter()
        order = _image_order(ids)  # image numbers k in the order their placeholders appear
        entries: dict[int, _Image] = {k: self._images[k - 1] for k in range(1, same + 1)}
        new_order = [k for k in order if k > same]
        if new_order and run_vision:
            crops_arr, grids = valid_crops(pv, sizes, order=[k - 1 - same for k in new_order])
            feats = self.vision(crops_arr, layout_index(grids))  # [sum of tokens of the new images, hidden]
            off = 0
            for k in new_order:
                n = num_tokens[k - 1]
                entries[k] = _Image(prints[k - 1], crops, n, feats[off: off + n])
                off += n
        t2 = time.perf_counter()
        features = None
        if order and run_vision:
            features = np.concatenate([entries[k].features for k in order], axis=0)
        reuse = _common_prefix(ids, self._tokens, same) if keep_cache else 0
        imgs = [entries[k] for k in range(1, len(images) + 1)] if run_vision else []
        return _Prepared(ids, features, imgs, reuse, {"preprocess": t1 - t0, "vision": t2 - t1})

    # ---- the request loop ----------------------------------------------------------------------
    def _request(self, prompt, images, num_crops, keep_cache, max_new_tokens, params: SamplingParams, stop,
                 stop_ids, stream: bool):
        """Validate everything, then return the generator that runs the request."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        params.validate()
        stop_strings, extra_ids = _parse_stop(stop)
        if stop_ids is None:
            stops = set(self.default_stop_ids)
        else:
            try:
                stops = {int(i) for i in stop_ids}
            except (TypeError, ValueError):
                raise InputError(f"stop_ids must be token ids, got {stop_ids!r}") from None
        stops |= set(extra_ids)
        prep = self._prepare(prompt, images, num_crops, keep_cache)
        n = prep.ids.size
        if n + max_new_tokens > self.max_length:
            raise InputError(f"the prompt is {n} tokens and max_new_tokens is {max_new_tokens}: {n} + "
                             f"{max_new_tokens} = {n + max_new_tokens} exceeds max_length {self.max_length} (shorten "
                             f"the prompt or lower max_new_tokens, or create the runtime with a larger max_length)")
        # this request owns the runtime from here: an unfinished stream of an earlier one ends (its next
        # resume raises RequestCancelled); the cache it left holds its tokens so far, which the prefix
        # matching in _prepare already accounted for
        self._next_id += 1
        self._active = rid = self._next_id
        return self._run(rid, prep, int(max_new_tokens), params, stops, stop_strings, stream)

    def _run(self, rid: int, prep: _Prepared, max_new_tokens: int, params: SamplingParams, stops: set[int],
             stop_strings: list[str], stream: bool) -> Iterator[str]:
        timings = dict(prep.timings)
        out: list[int] = []
        finish = FINISH_LENGTH
        detok = StreamDecoder(self.tokenizer) if (stream or stop_strings) else None
        matcher = _StopMatcher(stop_strings)
        text_parts: list[str] = []
        try:
            self._check_owner(rid)
            t0 = time.perf_counter()
            cached = self._prefill(prep.ids, prep.features, prep.reuse)
            self._images = prep.images
            t1 = time.perf_counter()
            timings["prefill"] = t1 - t0
            first_token_at = None
            sampler = Sampler(params)
            on_device = params.device_argmax
            steps = 0
            while True:
                if on_device:
                    tok = self.decoder.argmax()
                elif params.top_k and params.repetition_penalty == 1.0:
                    tok = sampler.pick(*self.decoder.topk(params.top_k))  # k values + ids leave the device
                else:  # repetition penalty, or sampling over the whole vocabulary: host logits
                    tok = sampler(self.decoder.logits_numpy(), self._tokens)
                out.append(tok)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                hit_stop = tok in stops
                if detok is not None:
                    delta = detok.put(tok)
                    if len(out) == max_new_tokens or hit_stop:
                        delta += detok.flush()
                    emit, matched = matcher.feed(delta)
                    if emit:
                        text_parts.append(emit)
                        if stream:
                            yield emit
                            self._check_owner(rid)
                    if matched:
                        finish = FINISH_STOP
                        break
                if hit_stop:
                    finish = FINISH_STOP
                    break
                if len(out) == max_new_tokens:
                    break
                self._advance(tok, from_device=on_device)
                steps += 1
            if detok is not None and not matcher.matched:
                tail = matcher.flush()
                if tail:
                    text_parts.append(tail)
                    if stream:
                        yield tail
            t2 = time.perf_counter()
            text = "".join(text_parts) if detok is not None else self.tokenizer.decode(out)
            timings["decode"] = t2 - t1
            timings["ttft"] = timings["preprocess"] + timings["vision"] + (first_token_at - t0)
            timings["total"] = timings["preprocess"] + timings["vision"] + (t2 - t0)
            timings["decode_steps"] = steps
            timings["tokens_per_s"] = steps / (t2 - first_token_at) if steps and t2 > first_token_at else 0.0
            result = GenerationResult(out, text, finish, timings, int(prep.ids.size), cached)
            self.last_result = result
            return result
        except GeneratorExit:
            raise
        except RequestCancelled:
            raise
        except BaseException:
            if self._active == rid:
                self._forget()  # an unexpected failure mid-request: drop the possibly inconsistent cache
            raise
        finally:
            if self._active == rid:
                self._active = 0

    def _check_owner(self, rid: int) -> None:
        if self._active != rid:
            raise RequestCancelled("this stream was ended by a newer request on the same runtime "
                                   "(a runtime runs one request at a time)")

    def _prefill(self, ids: np.ndarray, features: np.ndarray | None, reuse: int) -> int:
        """Make the cache hold exactly `ids`, keeping the first `reuse` cached rows when the rope tables
        allow it. Returns the number of rows kept."""
        dec = self.decoder
        long = self.long_rope == "always" or needs_long(self.rope, int(ids.size))
        if dec.rope_long != long:
            reuse = 0
        keep = max(0, min(reuse, ids.size - 1, dec.cache.length))  # prefill at least one token: its logits
        try:
            dec.cache.truncate(keep)
            dec.set_rope(long)
            skip = int((ids[:keep] < 0).sum())
            dec.prefill(ids[keep:], None if features is None or features.shape[0] == skip else features[skip:])
        except BaseException:
            self._forget()
            raise
        self._tokens = [int(i) for i in ids]
        self._features = features
        return keep

    def _advance(self, tok: int, from_device: bool) -> None:
        """Feed the token just chosen; at the LongRoPE crossing, recompute everything with the long tables."""
        total = len(self._tokens) + 1
        if self.long_rope == "auto" and not self.decoder.rope_long and needs_long(self.rope, total):
            ids = np.asarray(self._tokens + [tok], dtype=np.int64)
            self._prefill(ids, self._features, reuse=0)
            return
        self.decoder.step(None if from_device else tok)
        self._tokens.append(int(tok))

    def _forget(self) -> None:
        self.decoder.cache.reset()
        self._tokens, self._features, self._images = [], None, []


# ---- helpers ------------------------------------------------------------------------------------
def _image_list(images) -> list:
    return image_list(images)  # one home: runtime/processor.py (numpy arrays are one image each)


def _fingerprint(im) -> tuple:
    """Identity of an image's content, to recognise images already encoded in this conversation."""
    if isinstance(im, (str, os.PathLike)):
        p = os.fspath(im)
        try:
            st = os.stat(p)
            return ("path", os.path.abspath(p), st.st_size, st.st_mtime_ns)
        except OSError:
            return ("path", p)  # unreadable: preprocess reports it
    if isinstance(im, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.sha1(bytes(im)).hexdigest())
    if hasattr(im, "tobytes") and hasattr(im, "size") and hasattr(im, "mode"):
        try:
            return ("pil", im.mode, tuple(im.size), hashlib.sha1(im.tobytes()).hexdigest())
        except Exception:
            return ("obj", id(im))
    return ("obj", id(im))


def _image_order(ids: np.ndarray) -> list[int]:
    """Image numbers k (ids -k) in the order of their first placeholder position."""
    neg = ids[ids < 0]
    if neg.size == 0:
        return []
    _, first = np.unique(neg, return_index=True)
    return [int(-neg[i]) for i in sorted(first)]


def _common_prefix(ids: np.ndarray, cached: list[int], same_images: int) -> int:
    """Length of the common prefix of ids and the cached tokens; a placeholder of an image that is not one
    of the first `same_images` (unchanged) images ends it."""
    n = min(ids.size, len(cached))
    if n == 0:
        return 0
    a = ids[:n]
    b = np.asarray(cached[:n], dtype=np.int64)
    bad = (a != b) | (a < -same_images)
    idx = np.flatnonzero(bad)
    return int(idx[0]) if idx.size else n


def _parse_stop(stop) -> tuple[list[str], list[int]]:
    if stop is None:
        return [], []
    if isinstance(stop, (str, int, np.integer)):
        stop = [stop]
    strings, ids = [], []
    for s in stop:
        if isinstance(s, str):
            if not s:
                raise InputError("stop strings must not be empty")
            strings.append(s)
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            ids.append(int(s))
        else:
            raise InputError(f"stop entries must be strings or token ids, got {s!r}")
    return strings, ids


class _StopMatcher:
    """Holds back text that could be the start of a stop string; reports a match (text cut before it)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.matched = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        buf = self.pending + delta
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            pos = min(h[0] for h in hits)
            self.pending, self.matched = "", True
            return buf[:pos], True
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for j in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:j]):
                    hold = max(hold, j)
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


__all__ = ["Phi3VRuntime", "GenerationResult", "BundleError", "InputError", "ProviderError", "RequestCancelled"]
