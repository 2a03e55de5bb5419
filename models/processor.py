"""PyTorch-side processor: re-exports the torch-free runtime processor and converts its output to tensors."""

from __future__ import annotations

from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.processor import Phi3VProcessor, ProcessorOutput
from phi3v_edge.runtime.tokenizer import Phi3VTokenizer, StreamDecoder

__all__ = ["Phi3VProcessor", "ProcessorOutput", "Phi3VTokenizer", "StreamDecoder", "build_prompt", "to_torch"]


def to_torch(output: ProcessorOutput, device=None) -> dict:
    """ProcessorOutput -> dict of torch tensors: input_ids [1, L] int64, and for image requests
    pixel_values [N, num_crops+1, 3, 336, 336] float32 and image_sizes [N, 2] int64."""
    import torch  # the models side may use torch; imported here so this module loads without it

    out = {"input_ids": torch.from_numpy(output.input_ids).to(device)}
    if output.pixel_values is not None:
        out["pixel_values"] = torch.from_numpy(output.pixel_values).to(device)
        out["image_sizes"] = torch.from_numpy(output.image_sizes).to(device)
    return out
