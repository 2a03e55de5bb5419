"""One benchmark system measured in this process (the suite starts one process per system, so peak
memory and CUDA state are each system's own).

    python -m phi3v_edge.benchmarks.systems SYSTEM SPEC.json OUT.json

Systems: edge (phi3v-edge bundle; spec names the bundle and cuda_graph), torch (PyTorch reference,
bf16 SDPA on CUDA, fp32 on CPU), torch-nf4 (the reference with bitsandbytes 4-bit NF4 decoder weights),
ort-genai (onnxruntime-genai, its own INT4 builder, decoder only, same weights).
Every system reports the same fields (None where it has no such figure).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .measure import (GpuMemorySampler, bundle_decoder_weight_bytes, decoder_bytes_per_step, median,
                      mem_available_gib, peak_rss_gib)

FILLER = "The quick brown fox jumps over the lazy dog while the patient cat watches from the old wooden fence. "


def synthetic_image(width: int = 1000, height: int = 750, seed: int = 0):
    """A deterministic photo-sized RGB image (noise + shapes); 1000x750 gives a 2x2 grid at num_crops 4
    (757 image tokens) and a 3x4 grid at num_crops 16 (1921)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = int(rng.integers(0, width - 100)), int(rng.integers(0, height - 100))
        d.ellipse([x, y, x + 90, y + 90], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


def filler_prompt(tokenizer_count, target: int) -> str:
    """A chat prompt of about `target` tokens (never more)."""
    from phi3v_edge.runtime.chat_template import build_prompt

    def make(n):
        return build_prompt([{"role": "user", "content": FILLER * n}])[0]

    per = max(1, tokenizer_count(make(8)) - tokenizer_count(make(7)))
    n = max(1, (target - tokenizer_count(make(0))) // per)
    while n > 1 and tokenizer_count(make(n)) > target:
        n -= 1
    return make(n)


def image_prompt(seed: int = 0):
    """The image prompt; a new seed gives a new picture of the same size (same tokens), so that no
    runtime's image-feature cache turns a timed run into a cache hit."""
    from phi3v_edge.runtime.chat_template import build_prompt

    return build_prompt([{"role": "user", "content": "Describe the image in detail.",
                          "images": [synthetic_image(seed=seed)]}])


WARM_PROMPT = "<|user|>\nHello<|end|>\n<|assistant|>\n"


def _median_timings(runs: list[dict]) -> dict:
    keys = set().union(*runs)
    return {k: median([r.get(k) for r in runs]) for k in keys}


# ---- phi3v-edge --------------------------------------------------------------------------------------
def _with_session_config(entries: dict) -> None:
    """Benchmark candidates only: add ONNX Runtime session config entries (e.g. thread spinning) and session
    attributes (keys starting with "so.", e.g. so.enable_cpu_mem_arena) to every session this process makes."""
    from phi3v_edge.runtime import session as sess

    base = sess.session_options

    def patched(*args, **kwargs):
        so = base(*args, **kwargs)
        for k, v in entries.items():
            if k.startswith("so."):
                setattr(so, k[3:], v)
            else:
                so.add_session_config_entry(k, str(v))
        return so

    sess.session_options = patched


def export_options(manifest: dict) -> dict:
    """What the bundle was exported with (the row says which bundle it timed)."""
    dec, vis = manifest["decoder"], manifest["vision"]
    return {"block_size": dec.get("block_size"), "accuracy_level": dec.get("accuracy_level", 0),
            "vision_precision": vis.get("precision"), "lm_head_precision": dec.get("lm_head_precision"),
            "embedding_precision": dec.get("embedding_precision")}


def raw_step_s(dec, n: int = 8) -> float:
    """Seconds of one decode step of the graph alone: the last step's IOBinding (batch 1) run again n times
    (same position, same work; benchmark-only use of the decoder's binding). 1 / decode rate minus this is
    the runtime's per-step host overhead (sampling, buffers, the engine's loop)."""
    bd, ro = dec._step_binding(1)
    dec.session.run_with_iobinding(bd, ro)
    t0 = time.perf_counter()
    for _ in range(n):
        dec.session.run_with_iobinding(bd, ro)
    return (time.perf_counter() - t0) / n


def run_edge(spec: dict) -> dict:
    from phi3v_edge.runtime import Phi3VRuntime
    from phi3v_edge.runtime.bundle import load_manifest
    from phi3v_edge.runtime.threads import default_threads

    dev = spec["device"]
    bundle = Path(spec["bundle"])
    manifest = load_manifest(bundle)
    if spec.get("session_config"):
        _with_session_config(spec["session_config"])
    row = {"export": export_options(manifest), "threads": default_threads(spec.get("threads"))}
    with GpuMemorySampler() as mem:
        rt = Phi3VRuntime(bundle, provider=dev, max_length=spec["max_length"], threads=spec.get("threads"),
                          cuda_graph=spec.get("cuda_graph") if dev == "cuda" else None)
        if not spec["warmup"]:  # one short warm-up request instead of a full-length one per figure
            rt.generate(WARM_PROMPT, max_new_tokens=2, stop_ids=())  # text only: an image would cost a full prefill
        for crops in spec["crops"]:
            runs = []
            for i in range(spec["warmup"] + spec["runs"]):
                prompt, images = image_prompt(seed=1 + i)  # a new image each run: vision is timed every time
                res = rt.generate(prompt, images=images, num_crops=crops, max_new_tokens=1, stop_ids=())
                if i >= spec["warmup"]:
                    runs.append(res.timings)
            t = _median_timings(runs)
            ttft = sum(t.get(k) or 0.0 for k in ("preprocess", "vision", "prefill"))
            row[f"ttft_ms_crops{crops}"] = round(1e3 * ttft, 2)
            row[f"split_crops{crops}"] = {k: round(1e3 * (t.get(k) or 0.0), 2) for k in ("preprocess", "vision", "prefill")}
            row[f"prompt_tokens_crops{crops}"] = res.prompt_tokens
        count = lambda p: rt.count_tokens(p)  # noqa: E731
        for label, ctx in spec["contexts"].items():
            p = filler_prompt(count, ctx)
            rates, prefills, ids = [], [], None
            for i in range(spec["warmup"] + spec["runs"]):
                res = rt.generate(p, max_new_tokens=spec["new_tokens"], stop_ids=())
                if i >= spec["warmup"]:
                    rates.append(res.timings["tokens_per_s"])  # the runtime's own decode rate
                    # prompt in -> first token out (prefill + its argmax), as onnxruntime-genai's row counts it
                    prefills.append(res.timings["ttft"] - res.timings["preprocess"] - res.timings["vision"])
                ids = res.token_ids
            rate = median(rates)
            row[f"decode_tok_s_{label}"] = round(rate, 2)
            row[f"prefill_ms_{label}"] = round(1e3 * median(prefills), 1)
            row[f"context_{label}"] = res.prompt_tokens
            row[f"greedy_ids_{label}"] = ids
            step_bytes = decoder_bytes_per_step(bundle_decoder_weight_bytes(bundle, manifest), manifest["decoder"]["num_layers"],
                                                manifest["decoder"]["num_kv_heads"], manifest["decoder"]["head_dim"],
                                                res.prompt_tokens + spec["new_tokens"] // 2,
                                                2 if manifest["decoder"].get("io_dtype") == "float16" else 4)
            row[f"achieved_gbps_{label}"] = round(step_bytes * rate / 1e9, 3)
            row[f"step_gb_{label}"] = round(step_bytes / 1e9, 3)
            raw = raw_step_s(rt.decoder)
            row[f"raw_step_ms_{label}"] = round(1e3 * raw, 2)  # the decoder graph alone, same step re-run
            row[f"host_overhead_ms_{label}"] = round(1e3 * (1 / rate - raw), 2) if rate else None
    row["peak_gpu_gib"] = mem.peak_gib
    row["peak_rss_gib"] = peak_rss_gib()
    row["bundle_gb"] = round(sum(v["bytes"] for v in manifest["files"].values()) / 1e9, 3)
    return row


# ---- PyTorch reference (optionally bitsandbytes NF4) -------------------------------------------------
def _to_nf4(model):
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_up_proj"),
                             (layer.mlp, "down_proj")):
            lin = getattr(parent, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            setattr(parent, name, q.cuda())
    torch.cuda.empty_cache()
    return model


def run_torch(spec: dict, nf4: bool = False) -> dict:
    import torch

    from phi3v_edge.models.decoder import KVCache
    from phi3v_edge.models.modeling import Phi3VForCausalLM
    from phi3v_edge.runtime.processor import Phi3VProcessor

    dev = spec["device"]
    if nf4 and dev != "cuda":
        raise RuntimeError("bitsandbytes NF4 needs CUDA")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec.get("torch_dtype") or ("bf16" if dev == "cuda" else "fp32")]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    row = {}
    with GpuMemorySampler() as mem, torch.no_grad():
        model = Phi3VForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype, device=dev,
                                                 attn_implementation="sdpa" if dev == "cuda" else "eager")
        if nf4:
            model = _to_nf4(model)
        proc = Phi3VProcessor.from_pretrained(spec["checkpoint"])
        prompt, images = image_prompt()
        for crops in spec["crops"]:
            runs = []
            for i in range(spec["warmup"] + spec["runs"]):
                t0 = time.perf_counter()
                out = proc(prompt, images=images, num_crops=crops)
                t1 = time.perf_counter()
                ids = torch.from_numpy(out.input_ids).to(dev)
                emb = model.embed(ids, torch.from_numpy(out.pixel_values).to(dev),
                                  torch.from_numpy(out.image_sizes))
                sync()
                t2 = time.perf_counter()
                int(model(inputs_embeds=emb, cache=KVCache(len(model.model.layers))).logits[0, -1].argmax())
                t3 = time.perf_counter()
                if i >= spec["warmup"]:
                    runs.append({"preprocess": t1 - t0, "vision": t2 - t1, "prefill": t3 - t2})
            t = _median_timings(runs)
            row[f"ttft_ms_crops{crops}"] = round(1e3 * sum(t.values()), 2)
            row[f"split_crops{crops}"] = {k: round(1e3 * v, 2) for k, v in t.items()}
        count = lambda p: proc(p).input_ids.shape[1]  # noqa: E731
        n_layers = len(model.model.layers)
        for label, ctx in spec["contexts"].items():
            ids = torch.from_numpy(proc(filler_prompt(count, ctx)).input_ids).to(dev)
            rates, prefills = [], []
            for i in range(spec["warmup"] + spec["runs"]):
                cache = KVCache(n_layers)
                tp = time.perf_counter()
                tok = int(model(input_ids=ids, cache=cache).logits[0, -1].argmax())
                sync()
                t0 = time.perf_counter()
                prefills.append(t0 - tp)
                for _ in range(spec["new_tokens"] - 1):
                    tok = int(model(input_ids=torch.tensor([[tok]], device=dev), cache=cache).logits[0, -1].argmax())
                dt = time.perf_counter() - t0
                if i >= spec["warmup"]:
                    rates.append((spec["new_tokens"] - 1) / dt)
            rate = median(rates)
            row[f"decode_tok_s_{label}"] = round(rate, 2)
            row[f"prefill_ms_{label}"] = round(1e3 * median(prefills[spec["warmup"]:]), 1)
            row[f"context_{label}"] = int(ids.shape[1])
            cfg = model.config
            wbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                         if not n.startswith("model.vision_embed_tokens") and n != "model.embed_tokens.weight")
            wbytes += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "layers" in n)
            step = decoder_bytes_per_step(wbytes, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                          int(ids.shape[1]) + spec["new_tokens"] // 2, 2 if dtype != torch.float32 else 4)
            row[f"achieved_gbps_{label}"] = round(step * rate / 1e9, 3)
    row["peak_gpu_gib"] = mem.peak_gib
    row["peak_rss_gib"] = peak_rss_gib()
    row["bundle_gb"] = None
    return row


# ---- onnxruntime-genai (decoder only, its own builder, same weights) ---------------------------------
TEXT_CONFIG_DROP = ("img_processor", "embd_layer", "auto_map", "_attn_implementation", "attn_implementation",
                    "_name_or_path")


def text_only_checkpoint(src: Path, dst: Path) -> Path:
    """The decoder of our Phi-3.5-vision checkpoint as a plain Phi3ForCausalLM checkpoint: the same shard
    files (symlinked: no copy, no memory), an index listing only the decoder tensors, a phi3 config.

    The config drops the vision sections and `_attn_implementation` (the real config says
    flash_attention_2, which would make onnxruntime-genai's builder ask for flash-attn); LongRoPE's "su"
    becomes "longrope"."""
    from phi3v_edge.models.checkpoint import INDEX_FILE, CheckpointReader
    from phi3v_edge.models.config import ASSETS_DIR, Phi3VConfig

    if (dst / "config.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = Phi3VConfig.from_json(src)
    keys = [k for k in CheckpointReader(src).keys() if not k.startswith("model.vision_embed_tokens")]
    index = src / INDEX_FILE
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        wm = {k: wm[k] for k in keys}
    else:  # one unsharded file
        wm = {k: "model.safetensors" for k in keys}
    for f in sorted(set(wm.values())):
        (dst / f).unlink(missing_ok=True)
        (dst / f).symlink_to((src / f).resolve())
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=2))
    d = {k: v for k, v in cfg.to_dict().items() if k not in TEXT_CONFIG_DROP}
    d.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    if d.get("rope_scaling"):
        d["rope_scaling"] = dict(d["rope_scaling"], type="longrope")
    (dst / "config.json").write_text(json.dumps(d, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        p = src / f if (src / f).is_file() else ASSETS_DIR / f
        if p.is_file():
            (dst / f).write_bytes(p.read_bytes())
    return dst


def build_ort_genai(ck: Path, out: Path, dev: str, cache: Path, min_free_gib: float = 1.5) -> dict:
    """onnxruntime-genai's own builder, int4, in a child process; its wall time and peak RSS (the builder
    holds the whole model: over 20 GB for the full-size one). The child is stopped, with a clear error,
    if the machine's available memory falls under `min_free_gib` (rather than leaving it to the OOM killer)."""
    import resource

    extra = ["--extra_options", "enable_cuda_graph=1"] if dev == "cuda" else []
    log = out.with_name(out.name + ".build.log")
    t0, peak, stopped = time.perf_counter(), 0, None
    with open(log, "w") as f:
        child = subprocess.Popen([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ck), "-o", str(out),
                                  "-p", "int4", "-e", dev, "-c", str(cache)] + extra, stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
        while child.poll() is None:
            peak = max(peak, _rss_bytes(child.pid))
            avail = mem_available_gib()
            if avail is not None and avail < min_free_gib:
                stopped = f"stopped at {peak / 2 ** 30:.1f} GiB RSS: only {avail:.1f} GiB of memory was left"
                child.kill()
                child.wait()
                break
            time.sleep(0.2)
    if stopped or child.returncode:
        raise RuntimeError(f"onnxruntime-genai builder {stopped or 'failed'}: {log.read_text()[-800:]}")
    info = {"build_s": round(time.perf_counter() - t0, 1),
            "build_peak_rss_gib": round(max(peak, 1024 * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
                                        / 2 ** 30, 3)}
    (out / "phi3v_edge_build.json").write_text(json.dumps(info))
    return info


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def genai_graph_facts(model_dir: Path) -> dict:
    """From the built text graph: the embedding table's bytes (gathered, not streamed; fp32 on the CPU, fp16
    on CUDA; 0 where the embedding is a graph of its own, as in a phi3v package), the other decoder bytes,
    and the MatMulNBits accuracy_level / block size its builder chose."""
    import onnx

    cfg = json.loads((model_dir / "genai_config.json").read_text())
    path = model_dir / cfg["model"]["decoder"]["filename"]
    m = onnx.load(str(path), load_external_data=False)
    itemsize = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
                onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1}
    emb = sum(int(np.prod(t.dims)) * itemsize.get(t.data_type, 4) for t in m.graph.initializer
              if "embed_tokens" in t.name)
    data = {t.external_data[i].value for t in m.graph.initializer for i in range(len(t.external_data))
            if t.external_data[i].key == "location"}
    total = path.stat().st_size + sum((model_dir / f).stat().st_size for f in data)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    attr = lambda n, k: next((a.i for a in n.attribute if a.name == k), None)  # noqa: E731
    return {"embedding_bytes": emb, "decoder_bytes": total, "model_type": cfg["model"].get("type"),
            "accuracy_level": sorted({attr(n, "accuracy_level") or 0 for n in nbits}),
            "block_size": sorted({attr(n, "block_size") for n in nbits})}


def genai_with_threads(model_dir: Path, threads: int | None) -> Path:
    """The model directory as is (threads None: onnxruntime-genai's defaults), or a sibling that links its
    files and sets session_options.intra_op_num_threads of every graph (decoder, embedding, vision) in
    genai_config.json."""
    if not threads:
        return model_dir
    dst = model_dir.with_name(f"{model_dir.name}-t{threads}")
    dst.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "genai_config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((model_dir / "genai_config.json").read_text())
    for section in ("decoder", "embedding", "vision"):
        if section in cfg["model"]:
            cfg["model"][section].setdefault("session_options", {})["intra_op_num_threads"] = int(threads)
    (dst / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _genai_first_token(og, model, po, total: int, multimodal: bool):
    """A generator over our processor's output `po` (named tensors for a phi3v package, the ids appended
    for a text model); returns it after the first token, and the time that took."""
    from phi3v_edge.export.genai_host import named_tensors

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    inputs = named_tensors(og, po) if multimodal else po.input_ids[0].astype(np.int32)
    t0 = time.perf_counter()
    if multimodal:
        gen.set_inputs(inputs)
    else:
        gen.append_tokens(inputs)
    gen.generate_next_token()
    return gen, time.perf_counter() - t0


def run_ort_genai(spec: dict) -> dict:
    """onnxruntime-genai on the same weights: its own builder's model (built here, text only), or with
    spec["genai_package"] a phi3v-edge `export --format genai` package (then the image TTFT too)."""
    import onnxruntime_genai as og

    from phi3v_edge.runtime.processor import Phi3VProcessor

    dev = spec["device"]
    work = Path(spec["workdir"])
    if spec.get("genai_package"):
        out, build = Path(spec["genai_package"]), {"model": "phi3v-edge genai package"}
    else:
        ck = text_only_checkpoint(Path(spec["checkpoint"]), work / "og_ckpt")
        out = work / f"og_int4_{dev}"
        if not (out / "genai_config.json").is_file():
            need, avail = float(spec.get("build_min_avail_gb") or 0), mem_available_gib()
            if avail is not None and avail < need:
                raise RuntimeError(f"onnxruntime-genai's builder not run: it needs about {need:g} GB and "
                                   f"{avail:.1f} GiB is available (--genai-build-min-gb)")
            build = build_ort_genai(ck, out, dev, work / "og_cache")
        else:  # built by an earlier run: report that run's figures
            f = out / "phi3v_edge_build.json"
            build = dict(json.loads(f.read_text()), reused=True) if f.is_file() else {}
        build["model"] = "onnxruntime-genai builder"
    facts = genai_graph_facts(out)
    row = {**build, "threads": spec.get("threads") or "default", "export": {
        "accuracy_level": facts["accuracy_level"], "block_size": facts["block_size"]}}
    proc = Phi3VProcessor.from_pretrained(spec["checkpoint"])
    count = lambda p: proc(p).input_ids.shape[1]  # noqa: E731
    cfg = json.loads((Path(spec["checkpoint"]) / "config.json").read_text())
    with GpuMemorySampler() as mem:
        model = og.Model(str(genai_with_threads(out, spec.get("threads"))))
        multimodal = facts["model_type"] == "phi3v"
        if not spec["warmup"]:  # one short warm-up request, as run_edge
            warm = proc(WARM_PROMPT)
            _genai_first_token(og, model, warm, warm.input_ids.shape[1] + 2, multimodal)
        if multimodal:  # one image, as run_edge: our processor's tensors (preprocess timed)
            for crops in spec["crops"]:
                runs = []
                for i in range(spec["warmup"] + spec["runs"]):
                    prompt, images = image_prompt(seed=1 + i)
                    t0 = time.perf_counter()
                    po = proc(prompt, images=images, num_crops=crops)
                    pre = time.perf_counter() - t0
                    gen, first = _genai_first_token(og, model, po, po.input_ids.shape[1] + 1, True)
                    del gen
                    if i >= spec["warmup"]:
                        runs.append({"preprocess": pre, "vision+prefill": first})
                t = _median_timings(runs)
                row[f"ttft_ms_crops{crops}"] = round(1e3 * sum(t.values()), 2)
                row[f"split_crops{crops}"] = {"preprocess": round(1e3 * t["preprocess"], 2)}
                row[f"genai_vision_prefill_ms_crops{crops}"] = round(1e3 * t["vision+prefill"], 2)
                row[f"prompt_tokens_crops{crops}"] = int(po.input_ids.shape[1])
        for label, ctx in spec["contexts"].items():
            # the prompt run_edge times, as the same ids (phi3v-edge's processor: BOS per text chunk)
            po = proc(filler_prompt(count, ctx))
            n_prompt = int(po.input_ids.shape[1])
            rates, prefills = [], []
            for i in range(spec["warmup"] + spec["runs"]):
                gen, first = _genai_first_token(og, model, po, n_prompt + spec["new_tokens"], multimodal)
                t1 = time.perf_counter()
                n = 0
                while not gen.is_done() and n < spec["new_tokens"] - 1:
                    gen.generate_next_token()
                    n += 1
                t2 = time.perf_counter()
                generated = [int(t) for t in gen.get_sequence(0)[n_prompt:]]
                del gen
                if i >= spec["warmup"]:
                    rates.append(n / (t2 - t1))
                    prefills.append(first)
            row[f"greedy_ids_{label}"] = generated
            rate = median(rates)
            row[f"decode_tok_s_{label}"] = round(rate, 2)
            row[f"prefill_ms_{label}"] = round(1e3 * median(prefills), 1)
            row[f"context_{label}"] = n_prompt
            step = decoder_bytes_per_step(facts["decoder_bytes"] - facts["embedding_bytes"], cfg["num_hidden_layers"],
                                          cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"],
                                          n_prompt + spec["new_tokens"] // 2, 2 if dev == "cuda" else 4)
            row[f"achieved_gbps_{label}"] = round(step * rate / 1e9, 3)
            row[f"step_gb_{label}"] = round(step / 1e9, 3)
    row["peak_gpu_gib"] = mem.peak_gib
    row["peak_rss_gib"] = peak_rss_gib()
    row["bundle_gb"] = round(sum(p.stat().st_size for p in out.iterdir()
                                 if p.is_file() and p.name != "phi3v_edge_build.json") / 1e9, 3)
    return row


# ---- correctness in the same run ---------------------------------------------------------------------
def run_check(spec: dict) -> dict:
    """Float bundle (fp16 on CUDA, fp32 on CPU) vs the PyTorch reference (bf16 / fp32) on the same weights:
    relative L2 error of the last-position logits of a text prompt and of an image prompt."""
    import torch

    from phi3v_edge.models.modeling import Phi3VForCausalLM
    from phi3v_edge.runtime import Phi3VRuntime
    from phi3v_edge.runtime.processor import Phi3VProcessor

    dev = spec["device"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    rt = Phi3VRuntime(spec["bundle"], provider=dev, max_length=4096, cuda_graph=False if dev == "cuda" else None)
    model = Phi3VForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype, device=dev,
                                             attn_implementation="sdpa" if dev == "cuda" else "eager")
    proc = Phi3VProcessor.from_pretrained(spec["checkpoint"])
    out = {}
    from phi3v_edge.runtime.chat_template import build_prompt

    cases = {"text": build_prompt([{"role": "user", "content": FILLER * 4}]), "image": image_prompt()}
    for name, (prompt, images) in cases.items():
        got = rt.score(prompt, images or None)[0].astype(np.float64).ravel()
        p = proc(prompt, images=images or None)
        with torch.no_grad():
            kw = {}
            if p.pixel_values is not None:
                kw = dict(pixel_values=torch.from_numpy(p.pixel_values).to(dev), image_sizes=torch.from_numpy(p.image_sizes))
            want = model(input_ids=torch.from_numpy(p.input_ids).to(dev), **kw).logits[0, -1].double().cpu().numpy()
        out[f"logits_rel_err_{name}"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        out[f"argmax_equal_{name}"] = bool(got.argmax() == want.argmax())
    return out


SYSTEMS = {"edge": run_edge, "torch": run_torch, "torch-nf4": lambda s: run_torch(s, nf4=True),
           "ort-genai": run_ort_genai, "check": run_check}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    system, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    row = SYSTEMS[system](spec)
    Path(out_path).write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
