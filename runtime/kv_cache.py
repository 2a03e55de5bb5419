"""Preallocated KV cache of `max_batch` slots: one key and one value buffer [max_batch, kv_heads, max_length,
head_dim] per layer, allocated once per engine on the session's device.

A slot is one row of the batch dimension. Each call binds a view of these buffers: slot s alone ([1, ...] at
row s: prefill of one request) or the first b slots ([b, ...]: a batched decode step over a bucket of b rows).
A view is bound both as the decoder's `past_key_values.{i}.*` input and as its `present.{i}.*` output:
GroupQueryAttention sees the same address on both sides and writes the new rows in place (past/present share
one buffer), so no step copies or allocates cache memory. Rows of a slot past its `length` are ignored by the
graph (it reads `seqlens_k`), which makes forgetting a slot free.

Views are bound by address (IOBinding.bind_input / bind_output with a buffer pointer), which works the same on
the CPU and on CUDA and keeps the addresses fixed for CUDA graph replay.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from . import bundle as fmt


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_length: int, max_batch: int = 1,
                 dtype=np.float16, device: str = "cpu", device_id: int = 0):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_length, self.max_batch = max_length, max_batch
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, device_id
        shape = [max_batch, kv_heads, max_length, head_dim]
        self.slot_bytes = kv_heads * max_length * head_dim * self.dtype.itemsize  # one slot of one buffer
        if device == "cpu":
            # numpy owns the host memory (np.zeros: pages are touched only when written); OrtValues wrap it
            self._host = [np.zeros(shape, self.dtype) for _ in range(2 * num_layers)]
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._host]
        else:
            self._host = None
            self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, device_id)
                            for _ in range(2 * num_layers)]
        self._ptr = [b.data_ptr() for b in self.buffers]  # buffers[2 i]: layer i keys, buffers[2 i + 1]: values
        self.lengths = [0] * max_batch  # rows 0..length-1 of slot s are valid

    def bind(self, binding: ort.IOBinding, start: int, rows: int) -> None:
        """Bind slots start..start+rows-1 of every layer's buffers as both past input and present output."""
        if not (0 <= start and start + rows <= self.max_batch and rows >= 1):
            raise ValueError(f"slots {start}..{start + rows - 1} are outside the cache's {self.max_batch}")
        shape = [rows, self.kv_heads, self.max_length, self.head_dim]
        off = start * self.slot_bytes
        for i in range(self.num_layers):
            for j, (past, present) in enumerate(zip(fmt.past_names(i), fmt.present_names(i))):
                ptr = self._ptr[2 * i + j] + off
                binding.bind_input(past, self.device, self.device_id, self.dtype, shape, ptr)
                binding.bind_output(present, self.device, self.device_id, self.dtype, shape, ptr)

    def copy_slot(self, src: int, dst: int, rows: int, device_copy=None) -> None:
        """Make slot dst hold the first `rows` rows of slot src (n > 1 rows sharing one prefill).
        device_copy(src_ptr, dst_ptr, nbytes) does it on a device; on the CPU numpy copies the rows."""
        if self._host is not None:
            for a in self._host:
                a[dst, :, :rows] = a[src, :, :rows]
        else:
            for p in self._ptr:
                device_copy(p + src * self.slot_bytes, p + dst * self.slot_bytes, self.slot_bytes)
        self.lengths[dst] = rows

    def layer_numpy(self, layer: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's valid rows of one slot: (key, value) [1, kv_heads, length, head_dim]."""
        n = self.lengths[slot]
        k, v = (self.buffers[2 * layer + j].numpy()[slot: slot + 1, :, :n].copy() for j in range(2))
        return k, v
