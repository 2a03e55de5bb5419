"""Dense per-token training targets of the demo trainer (models/demo_labels.py): they must line up
with the pixels the processor produces, for every crop grid."""
from __future__ import annotations

import numpy as np
import pytest

from phi3v_edge.models import demo_data
from phi3v_edge.models.demo_labels import CHANNELS, dense_labels
from phi3v_edge.runtime.image_transform import image_crops


def _scenes(n):
    rng = np.random.default_rng(11)
    return [demo_data.make_scene(rng) for _ in range(n)]


@pytest.mark.parametrize("scene", _scenes(12), ids=lambda s: f"{s.size[0]}x{s.size[1]}-{s.count}")
def test_labels_line_up_with_the_processed_pixels(scene):
    lab = dense_labels(scene.image, [o[:2] for o in scene.objects], demo_data.NUM_CROPS)
    crops, (h, w), _ = image_crops(scene.image, demo_data.NUM_CROPS)
    views = 1 + (h // 336) * (w // 336)
    assert lab.shape == (views, 12, 12, len(CHANNELS)) and lab.dtype == np.float32
    # the object count: each object's center dot sums to 1 over the global view and over the tiles
    assert lab[0, ..., 1].sum() == pytest.approx(scene.count, abs=1e-4)
    assert lab[1:, ..., 1].sum() == pytest.approx(scene.count, abs=1e-4)
    # cover agrees with the pixels: a cell is mostly object iff its normalised pixels are far from white
    px = crops[:views]  # [V, 3, 336, 336]
    white = px.reshape(views, 3, 12, 28, 12, 28).transpose(0, 2, 4, 1, 3, 5)  # [V, 12, 12, 3, 28, 28]
    dark = (np.abs(white - px.max()).max(3) > 0.8).mean((3, 4))  # [V, 12, 12] share of clearly coloured pixels
    sure = (lab[..., 0] > 0.9) | (lab[..., 0] < 0.02)
    assert np.mean((dark[sure] > 0.5) == (lab[..., 0][sure] > 0.5)) > 0.97
    # outline cells are covered in part; the white HD padding is never image
    assert np.all(lab[..., 0][lab[..., 2] > 0.05] > 0.02)
    assert np.all((lab[..., 3] >= 0) & (lab[..., 3] <= 1)) and np.all(lab[..., 0] <= lab[..., 3] + 1e-6)


def test_every_crop_grid_occurs_in_the_labels():
    grids = {dense_labels(s.image, [o[:2] for o in s.objects], demo_data.NUM_CROPS).shape[0] for s in _scenes(30)}
    assert grids == {2, 3}  # 1x1 (global + 1 tile) and 1x2 / 2x1 (global + 2 tiles)
