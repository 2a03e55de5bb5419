"""Request preparation, run in the submitting thread: prompt + images -> token ids with -k image placeholders and
the image features in placeholder order. Torch-free.

    prompt, images -> processor (HD transform, chat-template tokens)  -> ids [L]
                   -> vision.onnx over the valid crops of the images not in the feature cache -> features [T, hidden]

The feature cache (LRU, bounded in bytes) keeps each image's features and token count by its content
(path + size + mtime, sha1 of bytes or of PIL pixels) and crop count, so a conversation that resends its
history over a stateless API (every HTTP chat turn) encodes each image once.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .image_layout import layout_index, valid_crops
from .frames import preprocess_same_size  # preprocess_images, bit for bit, batched per image size (video frames)
from .image_transform import check_num_crops
from .processor import Phi3VProcessor, check_placeholders, image_list

DEFAULT_FEATURE_CACHE_BYTES = 256 << 20


@dataclass
class Prepared:
    ids: np.ndarray  # [L] int64, -k at image k's positions
    features: np.ndarray | None  # [count of negative ids, hidden] in position order (None: no image)
    image_keys: list  # image k's identity (content, crops) at index k-1: prefix reuse compares them
    timings: dict[str, float]


class FeatureCache:
    def __init__(self, max_bytes: int = DEFAULT_FEATURE_CACHE_BYTES):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        if key is None:
            return None
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, num_tokens: int, features: np.ndarray) -> None:
        if key is None or features.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._d:
                return
            self._d[key] = (num_tokens, features)
            self.bytes += features.nbytes
            while self.bytes > self.max_bytes:
                _, (_, f) = self._d.popitem(last=False)
                self.bytes -= f.nbytes

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.bytes = 0


class Preparer:
    def __init__(self, processor: Phi3VProcessor, vision, cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES):
        self.processor, self.vision = processor, vision
        self.cache = FeatureCache(cache_bytes)

    def __call__(self, prompt: str, images=None, num_crops: int | None = None, run_vision: bool = True) -> Prepared:
        t0 = time.perf_counter()
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
        proc = self.processor
        try:
            images = image_list(images)
            crops = proc.num_crops if num_crops is None else check_num_crops(num_crops)
            check_placeholders(prompt, len(images))  # cheap checks before any image work
            keys = [_key(im, crops) for im in images]
            hits = [self.cache.get(k) for k in keys]
            todo = [i for i, h in enumerate(hits) if h is None]
            pv, sizes, ntok = (preprocess_same_size([images[i] for i in todo], crops, proc.image_mean,
                                                    proc.image_std, proc.max_pixels) if todo else (None, None, []))
            num_tokens = [h[0] if h is not None else 0 for h in hits]
            for j, i in enumerate(todo):
                num_tokens[i] = ntok[j]
            ids = proc.tokenize(prompt, num_tokens)[0]
        except InputError:
            raise
        except (ValueError, TypeError, OSError) as e:  # ImageError is a ValueError
            raise InputError(str(e)) from None
        t1 = time.perf_counter()
        order = image_order(ids)  # image numbers k in the order their placeholders appear
        features = None
        if run_vision and order:
            feats = {i + 1: hits[i][1] for i in range(len(images)) if hits[i] is not None}
            new = [k for k in order if k not in feats]
            if new:
                # vision in placeholder order over the images not cached (pixel rows: their index in `todo`)
                crops_arr, grids = valid_crops(pv, sizes, order=[todo.index(k - 1) for k in new])
                out = self.vision(crops_arr, layout_index(grids))  # [sum of their tokens, hidden]
                off = 0
                for k in new:
                    n = num_tokens[k - 1]
                    feats[k] = out[off: off + n]
                    self.cache.put(keys[k - 1], n, feats[k])
                    off += n
            features = np.concatenate([feats[k] for k in order], axis=0)
        t2 = time.perf_counter()
        return Prepared(ids, features, keys, {"preprocess": t1 - t0, "vision": t2 - t1})


def image_order(ids: np.ndarray) -> list[int]:
    """Image numbers k (ids -k) in the order of their first placeholder position."""
    neg = ids[ids < 0]
    if neg.size == 0:
        return []
    _, first = np.unique(neg, return_index=True)
    return [int(-neg[i]) for i in sorted(first)]


def _key(im, crops: int):
    """Identity of an image's content and crop count (None: not recognisable, never cached)."""
    if isinstance(im, (str, os.PathLike)):
        p = os.fspath(im)
        try:
            st = os.stat(p)
        except OSError:
            return None  # unreadable: preprocess reports it
        return ("path", os.path.abspath(p), st.st_size, st.st_mtime_ns, crops)
    if isinstance(im, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.sha1(bytes(im)).hexdigest(), crops)
    if hasattr(im, "tobytes") and hasattr(im, "size") and hasattr(im, "mode"):
        try:
            return ("pil", im.mode, tuple(im.size), hashlib.sha1(im.tobytes()).hexdigest(), crops)
        except Exception:
            return None
    return None
