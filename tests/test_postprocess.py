"""The batched post-process: every image of a batch gets exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch

from rtmdet.inference import postprocess
from rtmdet.inference.postprocess import PostprocessConfig, postprocess_batch

STRIDES = (8, 16, 32)


def _maps(n: int, classes: int, size: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(n, classes, size // s, size // s, generator=g) * 2 - 3 for s in STRIDES]
    reg = [torch.rand(n, 4, size // s, size // s, generator=g) * 3 * s for s in STRIDES]
    return cls, reg


@pytest.mark.parametrize("cfg", [PostprocessConfig(), PostprocessConfig(score_thr=0.05, nms_pre=40, max_per_img=25)],
                         ids=["defaults", "nms_pre-and-cap-bite"])
def test_a_batch_equals_its_images_one_by_one(cfg):
    cls, reg = _maps(3, 5, 128, seed=0)
    scale = [(0.5, 0.5), (1.0, 0.8), (2.0, 2.0)]
    ori = [(256, 256), (160, 128), (64, 64)]
    batch = postprocess_batch(cls, reg, STRIDES, (128, 128), scale, ori, cfg)
    for i in range(3):
        (alone,) = postprocess_batch([c[i : i + 1] for c in cls], [r[i : i + 1] for r in reg], STRIDES, (128, 128),
                                     [scale[i]], [ori[i]], cfg)
        for got, want in zip(batch[i], alone):
            assert torch.equal(got, want)
        boxes, scores, _ = batch[i]
        assert 0 < len(scores) <= cfg.max_per_img and (scores[:-1] >= scores[1:]).all()
        assert boxes[:, 2].max() <= ori[i][1] and boxes[:, 3].max() <= ori[i][0]


def test_nms_pre_keeps_the_best_per_image_and_level():
    cls, reg = _maps(2, 3, 64, seed=1)
    few = postprocess_batch(cls, reg, STRIDES, (64, 64), [(1.0, 1.0)] * 2, [(64, 64)] * 2,
                            PostprocessConfig(score_thr=0.0, nms_pre=1, iou_thr=1.0))
    for i, (_, scores, _) in enumerate(few):
        best = torch.stack([c[i].sigmoid().max() for c in cls])  # one candidate per level survives
        assert torch.equal(scores.sort(descending=True).values, best.sort(descending=True).values)


@pytest.mark.parametrize("iou_thr", [0.5, 0.0], ids=["preselection-suffices", "falls-back-to-all"])
def test_nms_of_the_best_candidates_first_changes_nothing(monkeypatch, iou_thr):
    # ~1,300 candidates per image; preselecting the best 800 (8 x 100) must give the very same
    # boxes when NMS keeps 100 or more of them, and fall back to all candidates when it keeps fewer
    # (IoU threshold 0: any overlap suppresses).
    cls, reg = _maps(2, 4, 128, seed=3)
    args = (cls, reg, STRIDES, (128, 128), [(1.0, 1.0)] * 2, [(128, 128)] * 2,
            PostprocessConfig(score_thr=0.001, iou_thr=iou_thr, max_per_img=100))
    monkeypatch.setattr(postprocess, "PRESELECT", 10**9)
    full = postprocess_batch(*args)
    calls = []
    real = postprocess.batched_nms
    monkeypatch.setattr(postprocess, "batched_nms", lambda b, *a: calls.append(len(b)) or real(b, *a))
    monkeypatch.setattr(postprocess, "PRESELECT", 0)
    fast = postprocess_batch(*args)
    for got, want in zip(fast, full):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    kept = [len(scores) for _, scores, _ in full]
    assert calls[0] == 800 and (kept == [100, 100]) == (iou_thr == 0.5)
    assert len(calls) == (2 if iou_thr == 0.5 else 4)  # per image: the best 800, then all of them if needed
