"""Training-only helpers of the demo trainer (models/train_demo.py): dense heads and the attention targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from phi3v_edge.models import demo_data, train_demo
from phi3v_edge.models.config import ASSETS_DIR
from phi3v_edge.runtime.processor import Phi3VProcessor

GLOBAL_TOKENS = 12 * 13  # the global view closes every image: 12 lines of 12 tokens + sub_GN


@pytest.fixture(scope="module")
def parts():
    proc = Phi3VProcessor.from_pretrained(ASSETS_DIR, num_crops=demo_data.NUM_CROPS)
    tok = train_demo.Tokens(proc)
    pool = train_demo.build_pool(proc, 3, np.random.default_rng(5))
    return tok, pool


def test_attention_targets_cover_the_global_view_and_count_on_bos(parts):
    tok, pool = parts
    a, b = pool[0], pool[1]
    qas = [(t, *demo_data.pair_question(a.scene, b.scene, t)) for t in ("samecolor", "sameshape")]
    group = train_demo.group_for(tok, [a, b], qas)
    ids = train_demo.collate([group])[0]
    t = train_demo.attention_targets([group], ids)[0]  # [4, S]
    assert torch.allclose(t.sum(-1), torch.ones(4))
    for head, img, pool_img in ((0, 1, a), (1, 2, b), (2, 1, a), (3, 2, b)):
        placeholders = (ids[0] == -img).nonzero()[:, 0]
        glob = placeholders[-GLOBAL_TOKENS:]
        cells = glob.view(12, 13)[:, :12].flatten()
        support = set(t[head].nonzero()[:, 0].tolist()) - {0}
        assert support and support <= set(cells.tolist())  # global view of that image, never a separator
        if head >= 2:  # BOS keeps 1 / (1 + count)
            assert float(t[head, 0]) == pytest.approx(1 / (1 + pool_img.scene.count), rel=1e-4)
        else:
            assert float(t[head, 0]) == 0.0
            assert torch.allclose(t[head, cells], pool_img.labels[0][..., 0].flatten() / pool_img.labels[0][..., 0].sum())


def test_dense_heads_give_a_finite_loss_and_gradients(parts):
    _, pool = parts
    heads = train_demo.DenseHeads(8)
    labels = [p.labels for p in pool]
    scenes = [p.scene for p in pool]
    cells = torch.randn(sum(lab.shape[0] for lab in labels), 12, 12, 8)
    loss, acc = heads(cells, labels, scenes)
    assert torch.isfinite(loss) and set(acc) == {"d_cov", "d_shp", "d_cnt"}
    loss.backward()
    assert heads.head.weight.grad is not None and torch.isfinite(heads.head.weight.grad).all()


def test_answer_probes_read_each_image_of_a_pair(parts):
    tok, pool = parts
    a, b = pool[0], pool[1]
    group = train_demo.group_for(tok, [a, b], [("samecolor", *demo_data.pair_question(a.scene, b.scene, "samecolor"))])
    probes = train_demo.AnswerProbes(16)
    h = torch.randn(3, 16, requires_grad=True)
    loss, acc = probes(h, torch.zeros(3, dtype=torch.long), [group])
    assert torch.isfinite(loss) and {"p0", "p1", "p2", "p3", "p4", "p5"} <= set(acc)
    assert ("p6" in acc) == (b.scene.count == 1)  # the side of the LAST image, one-object scenes only
    assert {"p8", "p9", "p10"} <= set(acc)  # same color / same shape / more: two-image groups
    single = train_demo.group_for(tok, [a], [("color", *demo_data.single_question(a.scene, "color"))])
    assert "p8" not in probes(h.detach(), torch.zeros(3, dtype=torch.long), [single])[1]
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_patch_pca_init_whitens_pool_patches(parts):
    from phi3v_edge.models.modeling import Phi3VForCausalLM

    _, pool = parts
    model = Phi3VForCausalLM(train_demo.demo_config())
    train_demo.init_patch_pca(model, pool, n_patches=4000)
    conv = model.model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding
    w = conv.weight.detach().flatten(1)  # [D, 588]: orthogonal directions, scaled by 1/sqrt(eigenvalue)
    dirs = w / w.norm(dim=1, keepdim=True)
    assert torch.allclose(dirs @ dirs.T, torch.eye(len(w)), atol=1e-3)
    with torch.no_grad():
        out = conv(torch.cat([p.crops for p in pool]).float())  # [V, D, 24, 24]
    var = out.transpose(0, 1).flatten(1).var(1)
    assert float(var[0]) == pytest.approx(1.0, rel=0.3)  # the leading component has unit variance on these views
