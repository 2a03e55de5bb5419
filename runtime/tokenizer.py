"""Torch-free Phi-3.5-vision tokenizer: a thin wrapper over `tokenizers.Tokenizer` plus a streaming detokenizer."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import tokenizers

# the special ids (one home: runtime/model_facts.py); generation stops at STOP_IDS (2, 32000, 32007)
from .model_facts import BOS_ID, END_ID, ENDOFTEXT_ID, EOS_ID, STOP_IDS  # noqa: F401

_REPLACEMENT = "\ufffd"


class Phi3VTokenizer:
    """Encode/decode with the model's own tokenizer.json (Llama SentencePiece BPE with byte fallback).

    tokenizer.json is used verbatim, as Microsoft's fast tokenizer ran it: normalizer
    Prepend("▁") + Replace(" ", "▁") on each added-token-free segment, post-processor adding BOS.
    (transformers 5's LlamaTokenizer rebuilds this pipeline as a Metaspace pre-tokenizer and then
    tokenizes differently after special tokens and at a leading space, e.g. "<|user|>\\n" gives
    [1, 32010, 13] instead of [1, 32010, 29871, 13]; we trust tokenizer.json.)
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tk = tokenizer
        self.bos_id = BOS_ID
        self.stop_ids = STOP_IDS

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Phi3VTokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path!r}")
        return cls(tokenizers.Tokenizer.from_file(path))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Phi3VTokenizer":
        """Load from a directory holding tokenizer.json (or from the tokenizer.json file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        return cls.from_file(path)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tk

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tk.id_to_token(int(id))

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of ``text``; ``bos`` prepends <s> (id 1) through the tokenizer's post-processor."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._tk.encode(text, add_special_tokens=bos).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Negative ids (image placeholders) are dropped."""
        return self._tk.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: ``put(ids)`` returns the new text, joined deltas equal ``decode(all ids)``.

    Each step decodes only a short window ``ids[prefix:]`` and compares it with the decode of
    ``ids[prefix:read]`` (text already emitted); the difference is emitted once it does not end with
    U+FFFD (a multi-byte character still waiting for its byte-fallback tokens). Decoding a window
    rather than a single token keeps SentencePiece's leading-space handling right (the decoder strips
    one leading space from whatever it decodes: both window decodes strip the same one).
    Cost per token is O(window), not O(history): the window restarts after each emission.
    """

    def __init__(self, tokenizer: Phi3VTokenizer | tokenizers.Tokenizer, skip_special_tokens: bool = True):
        self._tk = tokenizer.backend if isinstance(tokenizer, Phi3VTokenizer) else tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # window: ids from the prefix offset on
        self._read = 0  # ids[:_read] of the window are already emitted
        self._prefix_text = ""  # decode(ids[:_read])
        self._parts: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=self._skip)

    def put(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the newly completed text ('' if none yet)."""
        if isinstance(ids, int) or hasattr(ids, "__index__"):
            ids = [ids]
        new = [int(i) for i in ids if int(i) >= 0]
        if not new:
            return ""
        self._ids.extend(new)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        delta = text[len(self._prefix_text) :]
        # Next window starts at the old read offset.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._parts.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is pending (e.g. an incomplete byte sequence, as U+FFFD) at the end of a stream."""
        text = self._decode(self._ids)
        delta = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        self._ids = self._ids[self._read :] if delta else self._ids
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield non-empty text deltas as ids arrive from ``ids``, then the flushed remainder."""
        for i in ids:
            delta = self.put(i)
            if delta:
                yield delta
        tail = self.flush()
        if tail:
            yield tail
