"""Torch-free Phi-3.5-vision processor: prompt + images -> input_ids with -k image placeholders, pixel_values, image_sizes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from .chat_template import IMAGE_NUMBER, IMAGE_PATTERN  # the prompt is split at these, as the reference does
from .errors import InputError
from .image_transform import (
    ARRAY_FORMS,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    DEFAULT_NUM_CROPS,
    ImageInput,
    array_to_image,
    check_num_crops,
    num_image_tokens_for,
    preprocess_images,
)
from .tokenizer import Phi3VTokenizer



@dataclass
class ProcessorOutput:
    input_ids: np.ndarray  # [1, L] int64; image k occupies num_img_tokens[k-1] positions holding -k
    pixel_values: np.ndarray | None = None  # [N, num_crops+1, 3, 336, 336] float32 (crop 0 = global view)
    image_sizes: np.ndarray | None = None  # [N, 2] int64: (height, width) of each padded HD image
    num_img_tokens: list[int] = field(default_factory=list)  # [N] placeholder tokens per image


_SINGLE = (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)


def image_list(images) -> list:
    """The images of a request as a list: None -> [], one image -> [it], a list/tuple of images -> a list.

    An image is a file path (str or PathLike), encoded bytes, a PIL image or a uint8 numpy array
    [H, W, C] (C = 1, 3 or 4) / [H, W]; arrays are turned into PIL images here (a copy). Anything
    else (a float array, a 4-D array, a number, a dict, ...) raises InputError saying what is accepted."""
    if images is None:
        return []
    if isinstance(images, np.ndarray):
        return [_one_image(images, None)]  # one array is one image, never a list of its rows
    if isinstance(images, _SINGLE):
        return [images]
    if isinstance(images, (dict, set, frozenset)) or not hasattr(images, "__iter__"):
        raise InputError(f"images must be an image or a list of images, got {type(images).__name__} "
                         f"(an image is a file path, bytes, a PIL image or {ARRAY_FORMS})")
    return [_one_image(im, i) for i, im in enumerate(images)]


def _one_image(im, index: int | None):
    if isinstance(im, np.ndarray):
        try:
            return array_to_image(im)
        except InputError as e:
            raise InputError(f"image {index + 1}: {e}" if index is not None else str(e)) from None
    if not isinstance(im, _SINGLE):
        raise InputError(f"cannot read image of type {type(im).__name__} (image {index + 1}): expected a file "
                         f"path, bytes, a PIL image or {ARRAY_FORMS}")
    return im


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def check_placeholders(prompt: str, num_images: int) -> list[int]:
    """Image numbers k of the <|image_k|> placeholders in prompt order; ValueError unless they are
    exactly 1..num_images, each once (any order)."""
    numbers = [int(m) for m in IMAGE_NUMBER.findall(prompt)]
    if len(numbers) != num_images:
        raise ValueError(
            f"prompt has {_plural(len(numbers), 'image placeholder')} but "
            f"{_plural(num_images, 'image')} {'was' if num_images == 1 else 'were'} given "
            f"(write <|image_1|> .. <|image_N|>, one per image)"
        )
    seen: set[int] = set()
    for k in numbers:
        if k in seen:
            raise ValueError(f"image placeholder <|image_{k}|> appears more than once in the prompt")
        seen.add(k)
    if seen != set(range(1, num_images + 1)):
        bad = sorted(seen - set(range(1, num_images + 1)))
        missing = sorted(set(range(1, num_images + 1)) - seen)
        raise ValueError(
            f"image placeholders must be numbered <|image_1|> .. <|image_{num_images}|>: "
            f"found {', '.join(f'<|image_{k}|>' for k in bad)}, "
            f"missing {', '.join(f'<|image_{k}|>' for k in missing)}"
        )
    return numbers


class Phi3VProcessor:
    """Prompt text (with <|image_k|> placeholders) and images -> model inputs, without torch."""

    def __init__(
        self,
        tokenizer: Phi3VTokenizer,
        num_crops: int = DEFAULT_NUM_CROPS,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.tokenizer = tokenizer
        self.num_crops = check_num_crops(num_crops)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, num_crops: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> "Phi3VProcessor":
        """Load from a directory with tokenizer.json and preprocessor_config.json.

        num_crops defaults to the config's (4 for Phi-3.5-vision); it must be in 1..16.
        """
        path = os.fspath(path)
        cfg_path = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"preprocessor_config.json not found in {path!r}")
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if num_crops is None:
            num_crops = cfg.get("num_crops", DEFAULT_NUM_CROPS)
        num_crops = check_num_crops(num_crops)  # before the (slower) tokenizer load
        return cls(
            Phi3VTokenizer.from_pretrained(path),
            num_crops=num_crops,
            image_mean=cfg.get("image_mean", CLIP_MEAN),
            image_std=cfg.get("image_std", CLIP_STD),
            max_pixels=max_pixels,
        )

    def num_image_tokens_for(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Placeholder tokens an image of this original size will take (no pixel work)."""
        return num_image_tokens_for(width, height, self.num_crops if num_crops is None else num_crops)

    def tokenize(self, prompt: str, num_img_tokens: Sequence[int]) -> np.ndarray:
        """Prompt -> input_ids [1, L] int64: each text chunk between placeholders encoded on its own
        with a leading BOS; placeholder <|image_k|> -> num_img_tokens[k-1] copies of -k."""
        numbers = check_placeholders(prompt, len(num_img_tokens))
        chunks = IMAGE_PATTERN.split(prompt)  # len(numbers) + 1 chunks, empty ones included
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            ids.extend(self.tokenizer.encode(chunk, bos=True))
            if i < len(numbers):
                k = numbers[i]
                ids.extend([-k] * num_img_tokens[k - 1])
        return np.asarray(ids, dtype=np.int64)[None, :]  # [1, L]

    def __call__(
        self,
        prompt: str,
        images: ImageInput | Sequence[ImageInput] | None = None,
        num_crops: int | None = None,
    ) -> ProcessorOutput:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        images = image_list(images)
        num_crops = self.num_crops if num_crops is None else check_num_crops(num_crops)
        check_placeholders(prompt, len(images))  # cheap checks before any image work
        if not images:
            return ProcessorOutput(input_ids=self.tokenize(prompt, []))
        pixel_values, image_sizes, num_img_tokens = preprocess_images(
            images, num_crops, self.image_mean, self.image_std, self.max_pixels
        )
        return ProcessorOutput(
            input_ids=self.tokenize(prompt, num_img_tokens),
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            num_img_tokens=num_img_tokens,
        )
