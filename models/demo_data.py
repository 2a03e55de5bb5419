"""Synthetic picture Q&A for the small demo model (models/demo/): seeded, Pillow only, no torch.

A *scene* is one image with 1-4 objects of ONE shape kind (circle, square, triangle) and ONE color
(red, green, blue, yellow, purple, orange) on a light background; sizes and positions vary, objects
do not overlap. A one-object scene puts its object off-center in both axes (a quadrant), so that
left/right and top/bottom are always defined. Image sizes vary in size and aspect ratio (square,
landscape, portrait, 2:1 and wider), so that with the demo's num_crops (NUM_CROPS = 2) the HD
transform gives 1x1, 1x2 and 2x1 crop grids.

Questions (one-word answers), by task:

    color     What color is the shape? / What color are the shapes?      red, green, ..., orange
    shape     What shape is shown?                                       circle, square, triangle
    count     How many shapes are there?                                 one, two, three, four
    leftright Is the shape on the left or on the right?  (one object)    left, right
    topbottom Is the shape at the top or at the bottom?  (one object)    top, bottom
    more      Which image has more shapes, the first or the second?      first, second   (two images)
    samecolor Do both images have the same color?                        yes, no         (two images)
    sameshape Do both images show the same shape?                        yes, no         (two images)

    >>> from phi3v_edge.models import demo_data
    >>> ex = demo_data.make_example(np.random.default_rng(0))   # {"images", "question", "answer", "task"}
    >>> held_out = demo_data.dataset("heldout", 200)              # the same 200 examples every time
    >>> demo_data.prompt(ex)                                      # the chat-format prompt text

Train and held-out splits come from different seeds (SPLIT_SEEDS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

NUM_CROPS = 2  # the demo model's num_crops (preprocessor_config.json): crop grids 1x1, 1x2, 2x1

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 45, 170),
    "orange": (245, 130, 25),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4
EXTENT = {"circle": 1.0, "square": 1.0, "triangle": 1.3}  # drawn half-extent / r

# (width, height) before a +-12% jitter; ratio >= 2 gives a 1x2 grid (2x1 when portrait) at NUM_CROPS = 2
SIZES = ((336, 336), (448, 448), (500, 400), (400, 500), (560, 420), (420, 560), (672, 336), (336, 672),
         (720, 320), (320, 720))

SINGLE_TASKS = ("color", "shape", "count", "leftright", "topbottom")
PAIR_TASKS = ("more", "samecolor", "sameshape")
TASKS = SINGLE_TASKS + PAIR_TASKS
# how often each task is drawn by make_example (and by the trainer)
TASK_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 1.5, "leftright": 0.75, "topbottom": 0.75,
                "more": 1.0, "samecolor": 0.75, "sameshape": 0.75}

SPLIT_SEEDS = {"train": 20240501, "heldout": 777}

ANSWERS = tuple(COLORS) + SHAPES + COUNT_WORDS[1:] + ("left", "right", "top", "bottom", "first", "second", "yes", "no")


@dataclass
class Scene:
    image: Image.Image
    shape: str
    color: str
    count: int
    objects: list[tuple[float, float, float]] = field(default_factory=list)  # (cx, cy, radius) in pixels
    size: tuple[int, int] = (0, 0)  # (width, height)

    @property
    def horizontal(self) -> str:  # one-object scenes only
        return "left" if self.objects[0][0] < self.size[0] / 2 else "right"

    @property
    def vertical(self) -> str:
        return "top" if self.objects[0][1] < self.size[1] / 2 else "bottom"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rng: np.random.Generator):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9  # about the same area as the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:  # upright triangle, slightly rotated, about the same area as the circle
        r *= EXTENT["triangle"]
        a0 = -math.pi / 2 + float(rng.uniform(-0.25, 0.25))
        pts = [(cx + r * math.cos(a0 + k * 2 * math.pi / 3), cy + r * math.sin(a0 + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=fill)


def make_scene(rng: np.random.Generator, count: int | None = None, shape: str | None = None,
               color: str | None = None) -> Scene:
    """One image: `count` (1-4, random if None) objects of one shape and one color."""
    count = int(rng.integers(1, MAX_OBJECTS + 1)) if count is None else count
    shape = _pick(rng, SHAPES) if shape is None else shape
    color = _pick(rng, tuple(COLORS)) if color is None else color
    w0, h0 = _pick(rng, SIZES)
    j = float(rng.uniform(0.88, 1.12))
    w, h = int(round(w0 * j)), int(round(h0 * j))
    bg = tuple(int(v) for v in rng.integers(236, 256, size=3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    m = min(w, h)
    ext = EXTENT[shape]  # drawn half-extent / r, so that nothing is clipped or overlaps
    objects: list[tuple[float, float, float]] = []
    while len(objects) < count:
        objects = []
        for _ in range(200):  # rejection sampling of non-overlapping positions
            r = float(rng.uniform(0.13, 0.15)) * m
            e = r * ext
            if count == 1:  # off-center in both axes: a quadrant, clear of the midlines
                cx = float(rng.uniform(e + 0.03 * w, w / 2 - e - 0.03 * w)) if rng.random() < 0.5 else \
                    float(rng.uniform(w / 2 + e + 0.03 * w, w - e - 0.03 * w))
                cy = float(rng.uniform(e + 0.03 * h, h / 2 - e - 0.03 * h)) if rng.random() < 0.5 else \
                    float(rng.uniform(h / 2 + e + 0.03 * h, h - e - 0.03 * h))
            else:
                cx = float(rng.uniform(e + 3, w - e - 3))
                cy = float(rng.uniform(e + 3, h - e - 3))
            if all(math.hypot(cx - x, cy - y) > 1.1 * (r + rr) * ext for x, y, rr in objects):
                objects.append((cx, cy, r))
                if len(objects) == count:
                    break
    base = np.array(COLORS[color])
    for cx, cy, r in objects:
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-18, 19, size=3), 0, 255))
        _draw(draw, shape, cx, cy, r, fill, rng)
    return Scene(img, shape, color, count, objects, (w, h))


def single_question(scene: Scene, task: str) -> tuple[str, str]:
    """(question, answer) about one scene; leftright/topbottom need a one-object scene."""
    if task == "color":
        q = "What color is the shape?" if scene.count == 1 else "What color are the shapes?"
        return q, scene.color
    if task == "shape":
        return "What shape is shown?", scene.shape
    if task == "count":
        return "How many shapes are there?", COUNT_WORDS[scene.count]
    if scene.count != 1:
        raise ValueError(f"task {task!r} needs a one-object scene")
    if task == "leftright":
        return "Is the shape on the left or on the right?", scene.horizontal
    if task == "topbottom":
        return "Is the shape at the top or at the bottom?", scene.vertical
    raise ValueError(f"unknown single-image task {task!r}")


def pair_question(a: Scene, b: Scene, task: str) -> tuple[str, str]:
    """(question, answer) about two scenes; `more` needs different counts."""
    if task == "more":
        if a.count == b.count:
            raise ValueError("task 'more' needs two different counts")
        return "Which image has more shapes, the first or the second?", "first" if a.count > b.count else "second"
    if task == "samecolor":
        return "Do both images have the same color?", "yes" if a.color == b.color else "no"
    if task == "sameshape":
        return "Do both images show the same shape?", "yes" if a.shape == b.shape else "no"
    raise ValueError(f"unknown two-image task {task!r}")


def pick_task(rng: np.random.Generator) -> str:
    w = np.array([TASK_WEIGHTS[t] for t in TASKS])
    return TASKS[int(rng.choice(len(TASKS), p=w / w.sum()))]


def make_example(rng: np.random.Generator, task: str | None = None) -> dict:
    """One example: {"images": [PIL.Image, ...], "question": str, "answer": str, "task": str}."""
    task = pick_task(rng) if task is None else task
    if task in SINGLE_TASKS:
        scene = make_scene(rng, count=1 if task in ("leftright", "topbottom") else None)
        q, a = single_question(scene, task)
        return {"images": [scene.image], "question": q, "answer": a, "task": task}
    if task == "more":
        c1, c2 = (int(v) + 1 for v in rng.choice(MAX_OBJECTS, size=2, replace=False))
        s1, s2 = make_scene(rng, count=c1), make_scene(rng, count=c2)
    else:  # yes/no balanced
        s1 = make_scene(rng)
        attr = "color" if task == "samecolor" else "shape"
        values = tuple(COLORS) if attr == "color" else SHAPES
        same = rng.random() < 0.5
        v = getattr(s1, attr) if same else _pick(rng, tuple(x for x in values if x != getattr(s1, attr)))
        s2 = make_scene(rng, **{attr: v})
    q, a = pair_question(s1, s2, task)
    return {"images": [s1.image, s2.image], "question": q, "answer": a, "task": task}


def dataset(split: str, n: int) -> list[dict]:
    """The first n examples of a split ("train" or "heldout"); deterministic."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    return [make_example(rng) for _ in range(n)]


def prompt(example: dict) -> str:
    """The chat-format prompt: <|user|>\\n<|image_1|>\\n...QUESTION<|end|>\\n<|assistant|>\\n."""
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, len(example["images"]) + 1))
    return f"<|user|>\n{tags}{example['question']}<|end|>\n<|assistant|>\n"
