"""Host-side helpers for an onnxruntime-genai package (tests and benchmarks): our processor's output as its named
tensors, and a greedy generation loop. `og` is the onnxruntime_genai module, passed in (not imported here)."""
from __future__ import annotations

import numpy as np


def named_tensors(og, po, pixel_dtype=np.float32):
    """phi3v-edge ProcessorOutput -> og.NamedTensors: input_ids int32 (image k's placeholders hold -k), and with
    images pixel_values (in the vision graph's dtype: float16 for a --target cuda package), image_sizes and
    num_image_tokens (onnxruntime-genai sizes image_features from it). A C host does the same with
    OgaCreateNamedTensors / OgaNamedTensorsSet."""
    nt = og.NamedTensors()
    nt["input_ids"] = po.input_ids.astype(np.int32)
    if po.pixel_values is not None:
        nt["pixel_values"] = po.pixel_values.astype(pixel_dtype)
        nt["image_sizes"] = po.image_sizes.astype(np.int64)
        nt["num_image_tokens"] = np.asarray(po.num_img_tokens, np.int64)
    return nt


def greedy(og, model, inputs, prompt_len: int, max_new_tokens: int) -> list[int]:
    """Greedy ids (an eos id of genai_config.json, if hit, is the last one)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + max_new_tokens, do_sample=False)
    g = og.Generator(model, params)
    g.set_inputs(inputs)
    out = []
    while not g.is_done() and len(out) < max_new_tokens:
        g.generate_next_token()
        out.append(int(g.get_next_tokens()[0]))
    return out
