"""The committed demo model (models/demo/checkpoint) and its synthetic data generator (CPU, fast)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_edge.models import demo_data
from phi3v_edge.models.config import Phi3VConfig
from phi3v_edge.models.modeling import Phi3VForCausalLM

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
CKPT = DEMO / "checkpoint"


# ------------------------------------------------------------------------------------ the data
def test_dataset_is_deterministic_and_splits_differ():
    a, b = demo_data.dataset("heldout", 6), demo_data.dataset("heldout", 6)
    for x, y in zip(a, b):
        assert (x["question"], x["answer"], x["task"]) == (y["question"], y["answer"], y["task"])
        assert [np.asarray(i).tobytes() for i in x["images"]] == [np.asarray(i).tobytes() for i in y["images"]]
    t = demo_data.dataset("train", 6)
    assert all(np.asarray(x["images"][0]).tobytes() != np.asarray(y["images"][0]).tobytes() for x, y in zip(a, t))
    with pytest.raises(ValueError):
        demo_data.dataset("test", 1)


def test_examples_are_well_formed():
    from phi3v_edge.runtime.chat_template import build_prompt
    from phi3v_edge.runtime.image_transform import hd_image_size

    grids = set()
    for ex in demo_data.dataset("heldout", 60):
        assert ex["answer"] in demo_data.ANSWERS and ex["task"] in demo_data.TASKS
        assert len(ex["images"]) == (2 if ex["task"] in demo_data.PAIR_TASKS else 1)
        text, imgs = build_prompt([{"role": "user", "content": ex["question"], "images": ex["images"]}])
        assert text == demo_data.prompt(ex) and len(imgs) == len(ex["images"])
        for im in ex["images"]:
            h, w = hd_image_size(im.width, im.height, demo_data.NUM_CROPS)
            grids.add((h // 336, w // 336))
    assert grids == {(1, 1), (1, 2), (2, 1)}  # several crop grids at the demo's num_crops


def test_scene_answers_match_the_drawing():
    rng = np.random.default_rng(3)
    for _ in range(20):
        s = demo_data.make_scene(rng, count=1)
        (cx, cy, r), = s.objects
        px = np.asarray(s.image)[int(cy), int(cx)].astype(int)  # the object's center has its color
        assert np.abs(px - np.array(demo_data.COLORS[s.color])).max() <= 20
        assert demo_data.single_question(s, "leftright")[1] == ("left" if cx < s.image.width / 2 else "right")
    with pytest.raises(ValueError):
        demo_data.single_question(demo_data.make_scene(rng, count=3), "leftright")


# ------------------------------------------------------------------------------- the checkpoint
needs_ckpt = pytest.mark.skipif(not (CKPT / "config.json").is_file(), reason="models/demo/checkpoint not present")


@pytest.fixture(scope="module")
def model():
    return Phi3VForCausalLM.from_pretrained(CKPT)


@pytest.fixture(scope="module")
def proc():
    from phi3v_edge.runtime.processor import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(CKPT)


def _answer(model, proc, images, question) -> str | None:
    """Greedy answer text, or None when generation does not stop with <|end|> within 6 tokens."""
    ex = {"images": images, "question": question}
    out = proc(demo_data.prompt(ex), images=images)
    new = model.generate(torch.from_numpy(out.input_ids), torch.from_numpy(out.pixel_values),
                         torch.from_numpy(out.image_sizes), max_new_tokens=6)
    if new[-1] != 32007:  # must stop with <|end|>
        return None
    return proc.tokenizer.decode(new[:-1]).strip()


@needs_ckpt
def test_checkpoint_layout():
    from safetensors import safe_open

    files = {p.name for p in CKPT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "generation_config.json"} <= files
    assert sum(p.stat().st_size for p in CKPT.iterdir()) < 25e6
    cfg = Phi3VConfig.from_json(CKPT)
    assert cfg.vocab_size == 32064 and cfg.rope_type == "longrope" and cfg.original_max_position_embeddings == 4096
    assert cfg.vision.image_size == 336 and cfg.vision.patch_size == 14
    assert json.loads((CKPT / "config.json").read_text())["img_processor"]["vision_config"]["hidden_size"] == cfg.image_dim_out
    assert json.loads((CKPT / "preprocessor_config.json").read_text())["num_crops"] == demo_data.NUM_CROPS
    with torch.device("meta"):
        names = {k for k, _ in Phi3VForCausalLM(cfg).named_parameters()}
    with safe_open(str(CKPT / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == names
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())


# Regression floors for the committed checkpoint. They follow from its measured held-out accuracy
# (models/demo/eval.json, MODEL_CARD.md): the counts it gets right on these fixed questions, minus one
# for numerical slack across machines (8/8 and 12/12 for the checkpoint retrained on 2026-12-01, 95.3 %
# held-out). Retraining the checkpoint means re-measuring these.
BUNDLED_FLOOR = 7  # of the 8 bundled examples (the first held-out example of each task)
HELD_OUT_N, HELD_OUT_FLOOR = 12, 11  # of the first 12 held-out questions


@needs_ckpt
def test_answers_the_bundled_examples(model, proc):
    qs = json.loads((DEMO / "examples" / "questions.json").read_text())
    assert sorted(q["task"] for q in qs) == sorted(demo_data.TASKS)
    got = [_answer(model, proc, [Image.open(DEMO / "examples" / f) for f in q["images"]], q["question"]) for q in qs]
    correct = sum(g == q["answer"] for g, q in zip(got, qs))
    assert correct >= BUNDLED_FLOOR, list(zip(got, [q["answer"] for q in qs]))


@needs_ckpt
def test_answers_held_out_questions(model, proc):
    exs = demo_data.dataset("heldout", HELD_OUT_N)
    got = [_answer(model, proc, ex["images"], ex["question"]) for ex in exs]
    assert sum(g in demo_data.ANSWERS for g in got) >= HELD_OUT_N - 1, got  # answer words, then <|end|>
    correct = sum(g == ex["answer"] for g, ex in zip(got, exs))
    assert correct >= HELD_OUT_FLOOR, list(zip(got, [ex["answer"] for ex in exs]))
