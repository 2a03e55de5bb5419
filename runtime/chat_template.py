"""Phi-3.5-vision chat template in plain Python: messages (with optional images) -> prompt text and ordered images."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def image_tag(k: int) -> str:
    """Placeholder text for the k-th image (1-based) of a request."""
    return f"<|image_{k}|>"


def build_prompt(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
) -> tuple[str, list[Any]]:
    """Render the model's chat template; return (prompt_text, images_in_order).

    Each message is {"role": str, "content": str, "images": [...] (optional)} and renders as
    ``<|{role}|>\\n{content}<|end|>\\n``; images are numbered across the whole conversation in order
    and each one is written as ``<|image_k|>\\n`` before its message's text. ``<|assistant|>\\n`` is
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
        tags = ""
        for im in msg_images:
            images.append(im)
            tags += image_tag(len(images)) + "\n"
        parts.append(f"<|{role}|>\n{tags}{content}<|end|>\n")
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        parts.append("<|assistant|>\n")
    return "".join(parts), images
