"""Preallocated KV cache: one key and one value buffer [1, kv_heads, max_length, head_dim] per layer.

Allocated once per runtime on the session's device. Each buffer is bound both as the decoder's
`past_key_values.{i}.*` input and as its `present.{i}.*` output: GroupQueryAttention sees the same address
on both sides and appends the new rows in place (past/present share one buffer), so no step copies or
allocates cache memory. The cache's contents past `length` are ignored by the graph (it reads `seqlens_k`),
which makes `reset` and `truncate` free.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from . import bundle as fmt


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_length: int, dtype=np.float16,
                 device: str = "cpu", device_id: int = 0):
        self.num_layers, self.kv_heads, self.head_dim, self.max_length = num_layers, kv_heads, head_dim, max_length
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, device_id
        shape = [1, kv_heads, max_length, head_dim]
        # keys[i], values[i]: OrtValue [1, kv_heads, max_length, head_dim] on the device, never reallocated
        self.keys = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, device_id)
                     for _ in range(num_layers)]
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, device_id)
                       for _ in range(num_layers)]
        self.length = 0  # rows 0..length-1 of every buffer are valid

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.max_length * self.head_dim * self.dtype.itemsize

    @property
    def free(self) -> int:
        return self.max_length - self.length

    def reset(self) -> None:
        """Forget every row (no memory is touched)."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep the first `length` rows; the next write goes to row `length`."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of length {self.length} to {length}")
        self.length = length

    def advance(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise ValueError(f"KV cache overflow: {self.length} + {n} > max_length {self.max_length}")
        self.length += n

    def bind(self, binding: ort.IOBinding) -> None:
        """Bind every layer's buffer as both past input and present output."""
        for i in range(self.num_layers):
            pk, pv = fmt.past_names(i)
            ok, ov = fmt.present_names(i)
            binding.bind_ortvalue_input(pk, self.keys[i])
            binding.bind_ortvalue_input(pv, self.values[i])
            binding.bind_ortvalue_output(ok, self.keys[i])
            binding.bind_ortvalue_output(ov, self.values[i])

    def layer_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's valid rows: (key, value) [1, kv_heads, length, head_dim] (tests, debugging)."""
        return (self.keys[layer].numpy()[:, :, : self.length].copy(),
                self.values[layer].numpy()[:, :, : self.length].copy())
