"""The fixed-shape post-process gives exactly the eager post-process's boxes, scores and labels."""

from __future__ import annotations

import pytest
import torch

from rtmdet.inference import postprocess
from rtmdet.inference.postprocess import PostprocessConfig, postprocess_batch
from rtmdet.inference.postprocess_static import postprocess_batch_static
from test_postprocess import STRIDES, _maps

SCALE = [(0.5, 0.5), (1.0, 0.8), (2.0, 2.0)]
ORI = [(256, 256), (160, 128), (64, 64)]

CASES = {
    "defaults": PostprocessConfig(),
    "nms_pre-and-cap-bite": PostprocessConfig(score_thr=0.05, nms_pre=40, max_per_img=25),
    "deployment-threshold": PostprocessConfig(score_thr=0.3, iou_thr=0.5, max_per_img=100),
    "min-box-size": PostprocessConfig(score_thr=0.01, min_bbox_size=6.0),
    "nothing-over-the-threshold": PostprocessConfig(score_thr=0.999),
}


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert a.dtype == b.dtype and torch.equal(a, b)


# 136 px: level maps of 17x17, 8x8 and 4x4 locations x 5 classes, whose rows end in the CPU sigmoid
# kernel's scalar tail on some vector widths and not on others (its results can differ in the last bit).
@pytest.mark.parametrize("size", [128, 136])
@pytest.mark.parametrize("cfg", list(CASES.values()), ids=list(CASES))
def test_static_equals_eager(cfg, size):
    cls, reg = _maps(3, 5, size, seed=0)
    args = (cls, reg, STRIDES, (size, size), SCALE, ORI, cfg)
    want = postprocess_batch(*args)
    _same(postprocess_batch_static(*args), want)
    if cfg.score_thr < 0.9:
        assert all(len(s) > 0 for _, s, _ in want)  # not a comparison of empty results


@pytest.mark.parametrize("iou_thr", [0.5, 0.0], ids=["preselection-suffices", "falls-back-to-all"])
def test_static_equals_eager_when_the_preselection_bites(monkeypatch, iou_thr):
    # 800 of ~1,300 candidates per image go to NMS; with IoU 0 it keeps fewer than 100 of them
    # and the image is redone over all its candidates, as the eager path does.
    cls, reg = _maps(2, 4, 128, seed=3)
    monkeypatch.setattr(postprocess, "PRESELECT", 0)
    args = (cls, reg, STRIDES, (128, 128), [(1.0, 1.0)] * 2, [(128, 128)] * 2,
            PostprocessConfig(score_thr=0.001, iou_thr=iou_thr, max_per_img=100))
    want = postprocess_batch(*args)
    calls = []
    real = postprocess.postprocess_batch
    monkeypatch.setattr(postprocess, "postprocess_batch", lambda *a: calls.append(1) or real(*a))
    _same(postprocess_batch_static(*args), want)
    assert len(calls) == (0 if iou_thr == 0.5 else 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", list(CASES.values()), ids=list(CASES))
def test_static_equals_eager_on_the_gpu(cfg):
    cls, reg = _maps(3, 5, 128, seed=0)
    args = ([c.cuda() for c in cls], [r.cuda() for r in reg], STRIDES, (128, 128), SCALE, ORI, cfg)
    _same(postprocess_batch_static(*args), postprocess_batch(*args))


@pytest.mark.parametrize("crowd", [0, 30], ids=["spread", "crowded-locations"])
def test_the_best_pairs_are_found_among_the_best_locations(crowd):
    """select_candidates looks for the K+1 best (location, class) pairs among the K+1 best
    locations only. With `crowd` locations scoring high in every class, most of the best pairs
    share a location; the candidates' scores are still the K best of all pairs, and the K+1-th."""
    from rtmdet.inference.postprocess_static import select_candidates

    cls, reg = _maps(2, 40, 256, seed=5)
    g = torch.Generator().manual_seed(6)
    for c in cls:
        for i in range(2):
            hot = torch.randperm(c.shape[2] * c.shape[3], generator=g)[: crowd // 3]
            c[i].view(40, -1)[:, hot] += 6.0
    cfg = PostprocessConfig(score_thr=0.001)
    found = select_candidates(cls, reg, STRIDES, (256, 256), torch.ones(2, 4), cfg, k=500)
    assert found.ranked
    every = torch.cat([c.permute(0, 2, 3, 1).reshape(2, -1).sigmoid() for c in cls], dim=1)  # as the eager path
    best = every.topk(501, dim=1).values
    assert torch.equal(found.scores.sort(dim=1, descending=True).values, best[:, :500])
    assert torch.equal(found.beyond, best[:, 500])
    if crowd:  # the crowded locations hold most of the best pairs (40 classes each)
        assert (found.scores > 0.9).sum() >= 400
