"""Export options: the values each option accepts and the checks, in one place.

export_bundle (and the genai export), both graph builders and the quantizer validate through these, so an
option means the same and fails with the same message wherever it is given. Torch-free.
"""
from __future__ import annotations

from typing import Iterable, Mapping

PRECISIONS = ("fp32", "fp16", "int8", "int4")  # decoder layers and lm_head: float MatMul or MatMulNBits
VISION_PRECISIONS = ("fp32", "fp16", "int8")
EMBEDDING_PRECISIONS = ("fp32", "fp16", "int8")
IO_DTYPES = ("float32", "float16")  # activations
TARGETS = ("auto", "cuda", "cpu")
ACCURACY_LEVELS = (0, 4)  # MatMulNBits accuracy_level: 0 = fp32 activations, 4 = int8 activations (CPU kernels)
BLOCK_SIZES = (16, 32, 64, 128)  # MatMulNBits block sizes the quantizer packs
CLI_BLOCK_SIZES = (32, 64, 128)  # the ones `phi3v-edge export --block-size` offers


class ExportError(ValueError):
    """An export that cannot be done as asked (bad option, existing output, unusable checkpoint)."""


def check_choice(value, choices: Iterable, what: str, error: type[Exception] = ExportError):
    """value if it is one of choices, else `error` "<what> <value> is not supported (use one of ...)"."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        raise error(f"{what} {value!r} is not supported (use one of {', '.join(str(c) for c in choices)})")
    return value


def check_block_size(block_size, dims: Mapping[str, int] = {}, what: str = "",
                     error: type[Exception] = ExportError) -> int:
    """block_size as an int if it is one of BLOCK_SIZES and divides every K in dims (name -> input size of a
    quantized projection); else `error` naming the block size, or the size it does not divide."""
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise error(f"{what}block size {block_size} is not supported (use one of "
                    f"{', '.join(str(b) for b in BLOCK_SIZES)})")
    for name, k in dims.items():
        if k % block_size:
            raise error(f"{what}{name} = {k} (K of a quantized projection) is not divisible by the block size "
                        f"{block_size}; pick a block size that divides it")
    return int(block_size)
