"""`phi3v-edge export --format genai`: packages that onnxruntime-genai (CPU package, pinned in the test extra)
loads and runs. Greedy tokens equal phi3v-edge's runtime when both get the same inputs (our processor's ids,
pixel values and image sizes, fed to onnxruntime-genai as named tensors); onnxruntime-genai's own processor
runs the same prompts end to end; the INT4 demo package answers the example questions; LongRoPE across
original_max_position_embeddings is pinned down against the reference."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og
import pytest
from PIL import Image

from phi3v_edge.export.bundle import ExportError
from phi3v_edge.export.genai import export_genai
from phi3v_edge.export.genai_host import greedy, named_tensors
from phi3v_edge.runtime.processor import Phi3VProcessor

TEXT = "<|user|>\nWhat is in the picture? Describe it.<|end|>\n<|assistant|>\n"
ONE = "<|user|>\n<|image_1|>\nWhat is in the picture?<|end|>\n<|assistant|>\n"
TWO = "<|user|>\n<|image_1|>\n<|image_2|>\nHow do they differ?<|end|>\n<|assistant|>\n"


def _images(tmp_path_factory):
    """Two images of different HD grids (landscape 2x2 at 4 crops, portrait 2x1), saved for og.Images."""
    d = tmp_path_factory.mktemp("genai_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(300, 500), (700, 300)]):
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _images(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_model(tiny_package):
    return og.Model(str(tiny_package))


def named_inputs(proc: Phi3VProcessor, prompt: str, images) -> tuple[og.NamedTensors, int]:
    """Our processor's output as onnxruntime-genai named tensors, and the prompt length."""
    po = proc(prompt, [Image.open(p) for p in images])
    return named_tensors(og, po), po.input_ids.shape[1]


def genai_greedy(model, inputs, prompt_len: int, max_new_tokens: int) -> list[int]:
    return greedy(og, model, inputs, prompt_len, max_new_tokens)


# ---- the package ---------------------------------------------------------------------------------------
def test_package_files_and_config(tiny_package, tiny_checkpoint):
    cfg = json.loads((tiny_package / "genai_config.json").read_text())
    m = cfg["model"]
    assert m["type"] == "phi3v"
    for section in ("decoder", "embedding", "vision"):
        assert (tiny_package / m[section]["filename"]).is_file()
    assert m["vision"]["inputs"] == {"pixel_values": "pixel_values", "image_sizes": "image_sizes"}
    assert m["decoder"]["inputs"]["attention_mask"] == "attention_mask"
    assert cfg["search"]["past_present_share_buffer"] is True and cfg["search"]["max_length"] == 4096
    ckpt = json.loads((tiny_checkpoint / "config.json").read_text())
    assert m["decoder"]["num_hidden_layers"] == ckpt["num_hidden_layers"]
    assert m["decoder"]["head_size"] == ckpt["hidden_size"] // ckpt["num_attention_heads"]
    proc = json.loads((tiny_package / "processor_config.json").read_text())["processor"]["transforms"]
    assert [t["operation"]["type"] for t in proc] == ["DecodeImage", "ConvertRGB", "Phi3ImageTransform"]
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert proc[2]["operation"]["attrs"] == {"num_crops": pre["num_crops"], "num_img_tokens": 144}
    assert (tiny_package / "tokenizer.json").is_file() and (tiny_package / "tokenizer_config.json").is_file()


def test_bad_options_are_clear_errors(tiny_checkpoint, tiny_package, tmp_path, capsys):
    with pytest.raises(ExportError, match="already exists"):
        export_genai(tiny_checkpoint, tiny_package, "fp32", target="cpu")
    with pytest.raises(ExportError, match="max_length"):
        export_genai(tiny_checkpoint, tmp_path / "x", "fp32", target="cpu", max_length=10 ** 9)
    with pytest.raises(ExportError, match="all-logits"):
        export_genai(tiny_checkpoint, tmp_path / "y", "fp32", target="cpu", all_logits=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    from phi3v_edge.export import cli

    assert cli.main([str(tiny_checkpoint), "--out", str(tmp_path / "z"), "--max-length", "64", "--quiet"]) == 2
    assert "--format genai" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_vision_graph_equals_bundle_vision(tiny_package, tiny_bundle, images):
    """The package's vision graph (crop selection and layout inside the graph) gives the bundle's features."""
    import onnxruntime as ort
    from phi3v_edge.runtime.image_layout import layout_index, valid_crops

    proc = Phi3VProcessor.from_pretrained(tiny_bundle)
    po = proc(TWO, [Image.open(p) for p in images])
    ours = ort.InferenceSession(str(tiny_bundle / "vision.onnx"), providers=["CPUExecutionProvider"])
    crops, grids = valid_crops(po.pixel_values, po.image_sizes)
    want = ours.run(None, {"pixel_values": crops, "layout_index": layout_index(grids)})[0]
    pkg = ort.InferenceSession(str(tiny_package / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = pkg.run(None, {"pixel_values": po.pixel_values, "image_sizes": po.image_sizes})[0]
    assert got.shape == (sum(po.num_img_tokens), want.shape[1])
    np.testing.assert_array_equal(got, want)


def test_embedding_puts_each_images_rows_at_its_placeholders(tiny_package):
    """Vision output is in image index order; <|image_2|> placed first still gets image 2's rows."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(tiny_package / "embedding.onnx"), providers=["CPUExecutionProvider"])
    h = json.loads((tiny_package / "genai_config.json").read_text())["model"]["decoder"]["hidden_size"]
    feats = np.random.default_rng(1).standard_normal((5, h)).astype(np.float32)  # image 1: rows 0-1, image 2: 2-4
    ids = np.array([[1, 450, -2, -2, -2, 1, -1, -1, 29871]], np.int64)
    got = s.run(None, {"input_ids": ids, "image_features": feats})[0][0]
    np.testing.assert_array_equal(got[[2, 3, 4, 6, 7]], feats[[2, 3, 4, 0, 1]])
    text_only = s.run(None, {"input_ids": ids.clip(0), "image_features": feats[:0]})[0][0]
    np.testing.assert_array_equal(got[[0, 1, 5, 8]], text_only[[0, 1, 5, 8]])


# ---- same inputs, same tokens ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    from phi3v_edge.runtime import Phi3VRuntime

    return Phi3VRuntime(tiny_bundle, provider="cpu")


@pytest.mark.parametrize("prompt,n_images", [(TEXT, 0), (ONE, 1), (TWO, 2)], ids=["text", "one_image", "two_images"])
def test_greedy_tokens_equal_runtime(tiny_model, tiny_bundle, runtime, images, prompt, n_images):
    proc = Phi3VProcessor.from_pretrained(tiny_bundle)
    ims = images[:n_images]
    inputs, length = named_inputs(proc, prompt, ims)
    got = genai_greedy(tiny_model, inputs, length, 10)
    want = runtime.generate(prompt, [Image.open(p) for p in ims], max_new_tokens=10, stop_ids=()).token_ids
    assert got == want


def test_genai_own_processor_runs_end_to_end(tiny_model, images):
    """og.Images -> the model's multimodal processor -> generator, for the same three prompts."""
    proc = tiny_model.create_multimodal_processor()
    for prompt, ims in ((TEXT, []), (ONE, images[:1]), (TWO, images)):
        inputs = proc(prompt, images=og.Images.open(*ims)) if ims else proc(prompt)
        ids = inputs["input_ids"].as_numpy()
        assert (ids < 0).sum() == (inputs["num_image_tokens"].as_numpy().sum() if ims else 0)
        out = genai_greedy(tiny_model, inputs, ids.shape[-1], 4)
        assert len(out) == 4 and all(0 <= t < 32064 for t in out)


def test_quantized_gqa_package_equals_its_bundle(tmp_path_factory, images):
    """Quantization options and grouped KV heads: int8, asymmetric, block 64, kv_heads < heads. The package and
    the bundle of the same options give the same greedy tokens (the same MatMulNBits weights in both)."""
    from phi3v_edge.export.bundle import export_bundle
    from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint
    from phi3v_edge.runtime import Phi3VRuntime

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("gqa_ckpt"), tiny_config(num_kv_heads=2), seed=5)
    opts = {"precision": "int8", "target": "cpu", "block_size": 64, "symmetric": False, "accuracy_level": 0,
            "vision_precision": "fp32"}
    out = tmp_path_factory.mktemp("gqa")
    pkg = export_genai(ckpt, out / "genai", **opts)
    rt = Phi3VRuntime(export_bundle(ckpt, out / "bundle", **opts), provider="cpu")
    info = json.loads((pkg / "export_info.json").read_text())["text"]
    assert (info["precision"], info["block_size"], info["symmetric"]) == ("int8", 64, False)
    inputs, length = named_inputs(Phi3VProcessor.from_pretrained(pkg), ONE, images[:1])
    got = genai_greedy(og.Model(str(pkg)), inputs, length, 10)
    assert got == rt.generate(ONE, [Image.open(images[0])], max_new_tokens=10, stop_ids=()).token_ids


def test_cuda_target_package_runs_with_fp16_activations(tiny_checkpoint, tiny_package, tmp_path, images):
    """--target cuda (fp16 activations, int4, fp16 vision): on onnxruntime-genai's CPU provider (providers
    cleared) the fp16 graphs run; image features match the fp32 package's to fp16 accuracy, and the first
    greedy token is the fp32 package's."""
    import onnxruntime as ort

    pkg = export_genai(tiny_checkpoint, tmp_path / "cuda", "int4", target="cuda")
    cfg = json.loads((pkg / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    proc = Phi3VProcessor.from_pretrained(pkg)
    po = proc(ONE, [Image.open(images[0])])
    run = lambda d, px: ort.InferenceSession(str(d / "vision.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": px, "image_sizes": po.image_sizes})[0]
    f16, f32 = run(pkg, po.pixel_values.astype(np.float16)), run(tiny_package, po.pixel_values)
    assert f16.dtype == np.float16
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=0, atol=2e-2 * np.abs(f32).max())
    config = og.Config(str(pkg))
    config.clear_providers()
    got = greedy(og, og.Model(config), named_tensors(og, po, np.float16), po.input_ids.shape[1], 3)
    want = greedy(og, og.Model(str(tiny_package)), named_tensors(og, po), po.input_ids.shape[1], 3)
    assert len(got) == 3 and got[0] == want[0]


# ---- LongRoPE past original_max_position_embeddings ---------------------------------------------------------
def test_longrope_crossing_what_genai_does_and_the_exact_recipe(tmp_path_factory):
    """onnxruntime-genai cannot recompute the cache when a generation crosses original_max_position_embeddings
    (and RewindTo is not supported for phi3v): the package switches to the long factors for the new tokens while
    the cached keys keep their short-factor rotation, exactly the reference decoded with a cache and no
    recompute. A host that starts a new generator with the whole sequence at the crossing gets the
    reference's tokens (its recompute) exactly."""
    import torch
    from phi3v_edge.models.decoder import KVCache
    from phi3v_edge.models.modeling import Phi3VForCausalLM
    from phi3v_edge.models.testing import tiny_config, write_tiny_checkpoint

    orig, n = 32, 24
    cfg = tiny_config(original_max_position_embeddings=orig, max_position_embeddings=512)
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("rope_ckpt"), cfg, seed=3)
    pkg = export_genai(ckpt, tmp_path_factory.mktemp("rope_pkg") / "fp32", "fp32", target="cpu")
    ids = Phi3VProcessor.from_pretrained(ckpt)("<|user|>\nTell me a long story about a cat.<|end|>\n"
                                               "<|assistant|>\n").input_ids
    length = ids.shape[1]
    assert length < orig < length + n  # the generation crosses the boundary

    ref = Phi3VForCausalLM.from_pretrained(ckpt).eval()
    want = ref.generate(torch.from_numpy(ids), max_new_tokens=n, stop_ids=())  # recompute at the crossing
    with torch.no_grad():  # the same model decoding with its cache and never recomputing it
        cache, no_recompute = KVCache(cfg.num_hidden_layers), []
        logits = ref(input_ids=torch.from_numpy(ids), cache=cache).logits[:, -1]
        for _ in range(n):
            no_recompute.append(int(logits[0].argmax()))
            logits = ref(input_ids=torch.tensor([[no_recompute[-1]]]), cache=cache).logits[:, -1]
    cross = orig - length + 1  # index of the first token predicted from a sequence longer than orig
    assert want[:cross] == no_recompute[:cross] and want != no_recompute  # the difference is visible here

    model = og.Model(str(pkg))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length + n, do_sample=False)

    def start(seq):
        g = og.Generator(model, params)
        nt = og.NamedTensors()
        nt["input_ids"] = np.asarray(seq, np.int32).reshape(1, -1)
        g.set_inputs(nt)
        return g

    def generate(restart_at_crossing: bool) -> list[int]:
        g, out = start(ids), []
        while len(out) < n:
            if restart_at_crossing and len(g.get_sequence(0)) == orig + 1:
                g = start(g.get_sequence(0))  # the whole sequence again: every key under the long factors
            g.generate_next_token()
            out.append(int(g.get_next_tokens()[0]))
        return out

    assert generate(False) == no_recompute
    assert generate(True) == want


# ---- the demo model ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_package(tmp_path_factory):
    from phi3v_edge.models import demo

    return export_genai(demo.CHECKPOINT, tmp_path_factory.mktemp("genai_demo") / "int4", "int4", target="cpu")


def test_int4_demo_package_answers_the_example_questions(demo_package):
    """The INT4 CPU package (export_bundle's CPU defaults: decoder accuracy_level 4, int8 vision at 0), run by
    onnxruntime-genai on our processor's inputs, answers the bundled questions as the INT4 bundle does
    (tests/test_demo_command.py: >= 7 of 8)."""
    from phi3v_edge.models import demo
    from phi3v_edge.runtime.chat_template import build_prompt

    info = json.loads((demo_package / "export_info.json").read_text())
    assert info["text"]["precision"] == "int4" and info["vision"]["precision"] == "int8"
    model = og.Model(str(demo_package))
    proc = Phi3VProcessor.from_pretrained(demo_package)
    qs = demo.load_questions()
    right = 0
    for q in qs:
        prompt, ims = build_prompt([{"role": "user", "content": q["question"], "images": q["images"]}])
        inputs, length = named_inputs(proc, prompt, ims)
        out = genai_greedy(model, inputs, length, 16)
        assert out[-1] in (2, 32000, 32007)  # stopped by an eos id of genai_config.json
        right += proc.tokenizer.decode(out).strip() == q["answer"]
    assert right >= 7, f"{right}/{len(qs)}"


# ---- the README's Python lines ---------------------------------------------------------------------------
def readme_blocks() -> list[str]:
    """The ```python blocks of the README section "C, C++ and C# hosts", in order."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## C, C++ and C# hosts", 1)[1].split("\n## ", 1)[0]
    return [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]


def test_readme_python_lines_run(tiny_package, tiny_bundle, runtime, images, capsys):
    """The README's lines, on the tiny package and a test image (fewer new tokens): onnxruntime-genai's own
    processor streams text; with our processor's inputs the generator gives the runtime's tokens."""
    blocks = readme_blocks()
    assert len(blocks) == 2
    ns: dict = {}
    for b in blocks:
        code = b.replace('"phi35v-genai"', repr(str(tiny_package))).replace('"photo.jpg"', repr(images[0]))
        exec(compile(code.replace("+ 200", "+ 6"), "README.md", "exec"), ns)  # noqa: S102 - the README's own lines
    assert capsys.readouterr().out  # the first block streamed some text
    g = ns["generator"]  # the second block's generator, fed our processor's inputs
    out = []
    while not g.is_done():
        g.generate_next_token()
        out.append(int(g.get_next_tokens()[0]))
    want = runtime.generate(ns["prompt"], [Image.open(images[0])], max_new_tokens=6).token_ids  # eos ids: both stop
    assert out == want
