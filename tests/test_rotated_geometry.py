"""Rotated-box geometry: IoU against shapely on random boxes and by hand on the hard cases,
quads to minimum-area rectangles, and class-aware rotated NMS."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtmdet.geometry.rotated import quad_to_rbox, rbox_to_corners, rotated_iou, rotated_nms

shapely = pytest.importorskip("shapely")
from shapely.geometry import Polygon  # noqa: E402


def _shapely_iou(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = Polygon(a), Polygon(b)
    inter = pa.intersection(pb).area
    union = pa.area + pb.area - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 60
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40 + 0.5
    a = (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5) * math.pi
    return torch.cat([xy, wh, a], 1)


def test_iou_matches_shapely_on_random_boxes():
    a, b = _random_boxes(60, 0), _random_boxes(50, 1)
    ours = rotated_iou(a, b, chunk=100).numpy()
    ca, cb = rbox_to_corners(a).numpy(), rbox_to_corners(b).numpy()
    ref = np.array([[_shapely_iou(p, q) for q in cb] for p in ca])
    assert (ref > 0).sum() > 300  # enough overlapping pairs to mean something
    assert np.abs(ours - ref).max() < 1e-4
    aligned = rotated_iou(a[:50], b, aligned=True).numpy()
    assert np.abs(aligned - np.diag(ref[:50])).max() < 1e-4


def test_float32_and_the_hard_cases():
    box = [20.0, 30.0, 16.0, 6.0, 0.3]
    cases = [
        (box, box, 1.0),  # identical
        (box, [80.0, 30.0, 16.0, 6.0, 0.3], 0.0),  # disjoint
        ([20.0, 30.0, 10.0, 10.0, 0.0], [20.0, 30.0, 4.0, 4.0, 0.7], 16.0 / 100.0),  # contained
        ([20.0, 30.0, 16.0, 6.0, 0.0], [20.0, 30.0, 6.0, 16.0, math.pi / 2], 1.0),  # the same box turned 90 degrees
        ([20.0, 30.0, 16.0, 6.0, math.pi / 4], [20.0, 30.0, 16.0, 6.0, math.pi / 4 - math.pi], 1.0),  # turned by pi
        ([0.0, 0.0, 100.0, 0.01, 0.0], [0.0, 0.0, 100.0, 0.01, math.pi / 2 - 1e-3], None),  # thin cross
        ([0.0, 0.0, 10.0, 10.0, 0.0], [10.0, 0.0, 10.0, 10.0, 0.0], 0.0),  # touching edges
        ([0.0, 0.0, 0.0, 10.0, 0.0], [0.0, 0.0, 0.0, 10.0, 0.0], 0.0),  # zero width: overlaps nothing
    ]
    for a, b, want in cases:
        ta, tb = torch.tensor([a]), torch.tensor([b])
        got = float(rotated_iou(ta, tb)[0, 0])
        if want is None:
            want = _shapely_iou(rbox_to_corners(ta.double())[0].numpy(), rbox_to_corners(tb.double())[0].numpy())
        assert got == pytest.approx(want, abs=1e-4), (a, b)


def test_iou_is_differentiable():
    a = torch.tensor([[20.0, 30.0, 16.0, 6.0, 0.3]], requires_grad=True)
    b = torch.tensor([[22.0, 31.0, 14.0, 8.0, 0.1]])
    (1 - rotated_iou(a, b, aligned=True)).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_quads_become_minimum_area_rectangles():
    rb = torch.tensor([[50.0, 40.0, 30.0, 10.0, 0.4], [10.0, 20.0, 8.0, 12.0, -1.2]], dtype=torch.float64)
    quads = rbox_to_corners(rb).numpy()
    back, rect = quad_to_rbox(quads)
    assert rect.all()
    assert rotated_iou(torch.from_numpy(back).double(), rb, aligned=True).min() > 0.9999  # the same rectangles
    # A quad that is not a rectangle (one corner pulled out): flagged, and enclosed.
    quad = np.array([[[0.0, 0.0], [10.0, 0.0], [12.0, 7.0], [0.0, 5.0]]])
    box, rect = quad_to_rbox(quad)
    assert not rect[0]
    corners = rbox_to_corners(torch.from_numpy(box).double())[0].numpy()
    enclosing = Polygon(corners).buffer(1e-3)
    assert all(enclosing.contains(shapely.geometry.Point(p)) for p in quad[0])
    assert -math.pi / 2 <= box[0, 4] < math.pi / 2


def test_rotated_nms_keeps_the_best_of_each_overlapping_group_per_class():
    boxes = torch.tensor([[20.0, 20.0, 10.0, 4.0, 0.5], [20.5, 20.0, 10.0, 4.0, 0.45], [60.0, 60.0, 8.0, 8.0, 0.0],
                          [20.0, 20.0, 10.0, 4.0, 0.5]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.8])
    assert rotated_nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert rotated_nms(boxes, scores, 0.5, labels=torch.tensor([0, 0, 0, 1])).tolist() == [1, 3, 2]
    assert rotated_nms(boxes[:0], scores[:0], 0.5).numel() == 0


def _shapely_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, thr: float) -> list[int]:
    """The textbook greedy NMS on shapely's polygon IoU."""
    corners = rbox_to_corners(torch.from_numpy(boxes)).numpy()
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        order = [j for j in order if labels[j] != labels[i] or _shapely_iou(corners[i], corners[j]) <= thr]
    return keep


@pytest.mark.parametrize("thr", [0.1, 0.5])
def test_rotated_nms_agrees_with_shapely_on_random_sets(thr):
    rng = np.random.default_rng(int(thr * 10))
    for _ in range(5):
        n = 120
        boxes = np.column_stack([rng.uniform(0, 100, (n, 2)), rng.uniform(4, 40, (n, 2)),
                                 rng.uniform(-math.pi / 2, math.pi / 2, n)])
        scores, labels = rng.permutation(n) / n, rng.integers(0, 3, n)
        ref = _shapely_nms(boxes, scores, labels, thr)
        got = rotated_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr, torch.from_numpy(labels))
        assert got.tolist() == ref
        assert rotated_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr, torch.from_numpy(labels),
                           max_keep=7).tolist() == ref[:7]


def test_rotated_iou_loss_is_zero_on_the_target_and_its_gradient_helps():
    from rtmdet.training.losses_rotated import rotated_iou_loss

    target = torch.tensor([[30.0, 30.0, 20.0, 8.0, 0.4]])
    assert float(rotated_iou_loss(target, target)) == pytest.approx(0.0, abs=1e-5)
    pred = torch.tensor([[33.0, 28.0, 14.0, 10.0, 0.1]], requires_grad=True)
    before = rotated_iou_loss(pred, target)
    before.sum().backward()
    with torch.no_grad():
        after = rotated_iou_loss(pred - 5.0 * pred.grad, target)
    assert 0 < float(after) < float(before.detach())  # a small step down the gradient raises the IoU
    far = torch.tensor([[300.0, 300.0, 5.0, 5.0, 0.0]])
    assert float(rotated_iou_loss(far, target, weight=torch.tensor([2.0]))) == pytest.approx(2.0, abs=1e-5)
