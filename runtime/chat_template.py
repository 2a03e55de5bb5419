"""Phi-3.5-vision chat template in plain Python: messages (with optional images) -> prompt text and ordered images."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

# <|image_k|> placeholders: the prompt is split at IMAGE_PATTERN; IMAGE_NUMBER captures k
IMAGE_PATTERN = re.compile(r"<\|image_\d+\|>")
IMAGE_NUMBER = re.compile(r"<\|image_(\d+)\|>")


def image_tag(k: int) -> str:
    """Placeholder text for the k-th image (1-based) of a request."""
    return f"<|image_{k}|>"


def build_prompt(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
) -> tuple[str, list[Any]]:
    """Render the model's chat template; return (prompt_text, images_in_order).

    Each message is {"role": str, "content": str, "images": [...] (optional)} and renders as
    ``<|{role}|>\\n{content}<|end|>\\n``; images are numbered across the whole conversation in order
    and each one is written as ``<|image_k|>\\n`` before its message's text, unless the text already holds
    the placeholders of its images (then it is used as written; they must be exactly that message's
    <|image_k|> numbers, in any order). A message without images is rendered as written. ``<|assistant|>\\n`` is
    appended when add_generation_prompt is set and the last message is not the assistant's
    (same as the Jinja template in tokenizer_config.json).
    """
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if len(messages) == 0:
        raise ValueError("messages is empty")
    parts: list[str] = []
    images: list[Any] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content", "")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} needs a non-empty string 'role', got {role!r}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"message {i} 'content' must be a str, got {type(content).__name__}")
        msg_images = m.get("images")
        if msg_images is None:
            msg_images = []
        elif not isinstance(msg_images, (list, tuple)):
            msg_images = [msg_images]  # a single image (a numpy array too: one image, not a list of rows)
        first = len(images) + 1
        images.extend(msg_images)
        tags = "".join(image_tag(k) + "\n" for k in range(first, len(images) + 1))
        if msg_images and IMAGE_NUMBER.search(content):
            _check_own_placeholders(i, content, first, len(images))
            tags = ""  # the user placed them: not added a second time
        parts.append(f"<|{role}|>\n{tags}{content}<|end|>\n")
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        parts.append("<|assistant|>\n")
    return "".join(parts), images


def _check_own_placeholders(i: int, content: str, first: int, last: int) -> None:
    """ValueError unless the placeholders in message i's text are exactly <|image_first|> .. <|image_last|>."""
    found = sorted(int(k) for k in IMAGE_NUMBER.findall(content))
    want = list(range(first, last + 1))
    if found != want:
        n = last - first + 1
        names = ", ".join(image_tag(k) for k in want)
        raise ValueError(
            f"message {i} has {n} image{'s' if n != 1 else ''} and its text holds "
            f"{', '.join(image_tag(k) for k in found)}: images are numbered across the conversation, so write "
            f"{names} (each once) where {'they go' if n != 1 else 'it goes'}, or leave the placeholders out and "
            "they are added before the text")
