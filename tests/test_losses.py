"""QFL, GIoU, priors and RTMDetLoss: hand-computed values, normalization, gradients, learning."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from rtmdet.training.assigner import DynamicSoftLabelAssigner
from rtmdet.training.losses import (RTMDetLoss, decode_distances, flatten_levels, giou_loss,
                                    make_priors, quality_focal_loss)

SIZES = [(8, 8), (4, 4), (2, 2)]  # a 64 px image at strides 8, 16, 32


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_qfl_matches_hand_computed_values() -> None:
    # Row 0: positive of class 0 with IoU target 0.8; row 1: background.
    logits = torch.tensor([[0.5, -1.0], [2.0, -3.0]], dtype=torch.float64)
    loss = quality_focal_loss(logits, torch.tensor([0.8, 0.0], dtype=torch.float64),
                              torch.tensor([0, 2]))
    s = _sigmoid(0.5)
    pos = -(0.8 * math.log(s) + 0.2 * math.log(1 - s)) * abs(0.8 - s) ** 2

    def neg(x: float) -> float:
        return -math.log(1 - _sigmoid(x)) * _sigmoid(x) ** 2

    expected = [[pos, neg(-1.0)], [neg(2.0), neg(-3.0)]]
    assert loss.flatten().tolist() == pytest.approx(sum(expected, []), rel=1e-12)
    assert quality_focal_loss(logits, torch.tensor([0.8, 0.0], dtype=torch.float64),
                              torch.tensor([0, 2]), reduction="sum").item() \
        == pytest.approx(sum(map(sum, expected)), rel=1e-12)


def test_qfl_is_bce_times_modulating_factor() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 6) * 3
    labels = torch.randint(0, 7, (50,))  # 6 = background
    scores = torch.rand(50)
    target = torch.zeros(50, 6)
    fg = labels < 6
    target[fg, labels[fg]] = scores[fg]
    for beta in (1.0, 2.0):
        expected = F.binary_cross_entropy_with_logits(logits, target, reduction="none") \
            * (logits.sigmoid() - target).abs().pow(beta)
        got = quality_focal_loss(logits, scores, labels, beta=beta)
        assert torch.allclose(got, expected, atol=1e-6)


def test_giou_loss_is_torchvisions_value_and_gradient() -> None:
    from torchvision.ops import generalized_box_iou_loss

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 50
    pred = torch.cat([xy, xy + torch.rand(500, 2, generator=g) * 30 - 5], 1).requires_grad_()  # some inverted
    target = torch.cat([xy + 3, xy + 3 + torch.rand(500, 2, generator=g) * 30], 1)
    target[:50] = target[:50] + 100  # disjoint pairs: no intersection
    ours, theirs = giou_loss(pred, target, reduction="none"), generalized_box_iou_loss(pred, target)
    assert torch.equal(ours, theirs)
    assert torch.equal(*(torch.autograd.grad(v.sum(), pred)[0] for v in (ours, theirs)))


def test_giou_loss_known_boxes() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    others = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    loss = giou_loss(boxes, others, reduction="none")
    # identical: 0; disjoint: IoU 0, hull 3, union 2 -> 1 + 1/3; overlap: 1 - (1/7 - 2/9)
    assert loss.tolist() == pytest.approx([0.0, 4.0 / 3.0, 1.0 - 1.0 / 7.0 + 2.0 / 9.0],
                                          abs=1e-6)
    weighted = giou_loss(boxes, others, weight=torch.tensor([1.0, 0.5, 2.0]))
    assert weighted.item() == pytest.approx(4.0 / 6.0 + 2.0 * (1.0 - 1.0 / 7.0 + 2.0 / 9.0))


def test_make_priors_order_and_decode() -> None:
    priors = make_priors([(2, 3), (1, 2)], strides=(8, 16))
    assert priors.tolist() == [
        [0, 0, 8, 8], [8, 0, 8, 8], [16, 0, 8, 8], [0, 8, 8, 8], [8, 8, 8, 8], [16, 8, 8, 8],
        [0, 0, 16, 16], [16, 0, 16, 16]]
    # Flattening [B, K, H, W] maps must walk the priors in the same order.
    maps = [torch.arange(6.0).reshape(1, 1, 2, 3), torch.arange(6.0, 8.0).reshape(1, 1, 1, 2)]
    assert flatten_levels(maps)[0, :, 0].tolist() == list(range(8))
    boxes = decode_distances(priors[:1], torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]))
    assert boxes.tolist() == [[[-1.0, -2.0, 3.0, 4.0]]]


def _head_outputs(batch: int, num_classes: int, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    cls = [torch.randn(batch, num_classes, h, w, generator=gen) - 2 for h, w in SIZES]
    reg = [(torch.rand(batch, 4, h, w, generator=gen) * 2 + 0.5) * s
           for (h, w), s in zip(SIZES, (8, 16, 32))]
    if requires_grad:
        for t in cls + reg:
            t.requires_grad_()
    return cls, reg


GT_BOXES = torch.tensor([[[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 56.0], [0, 0, 0, 0]],
                         [[10.0, 12.0, 50.0, 30.0], [0, 0, 0, 0], [0, 0, 0, 0]]])
GT_LABELS = torch.tensor([[0, 2, -1], [1, -1, -1]])


def test_loss_equals_manual_mmdet_formula() -> None:
    cls, reg = _head_outputs(2, 3)
    out = RTMDetLoss()(cls, reg, GT_BOXES, GT_LABELS)
    priors = make_priors(SIZES)
    logits = flatten_levels(cls)
    boxes = decode_distances(priors, flatten_levels(reg))
    t = DynamicSoftLabelAssigner()(logits, boxes, priors, GT_BOXES, GT_LABELS)
    avg = max(t.assign_metrics.sum().item(), 1.0)  # same factor for both terms
    qfl = quality_focal_loss(logits, t.assign_metrics, t.labels, reduction="sum")
    giou = giou_loss(boxes[t.fg_mask], t.bbox_targets[t.fg_mask], t.assign_metrics[t.fg_mask])
    assert int(out["num_pos"]) == int(t.fg_mask.sum()) > 0
    assert out["loss_cls"].item() == pytest.approx(qfl.item() / avg, rel=1e-5)
    assert out["loss_bbox"].item() == pytest.approx(2.0 * giou.item() / avg, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_cls"].item() + out["loss_bbox"].item())


def test_duplicating_the_batch_leaves_the_loss_unchanged() -> None:
    cls, reg = _head_outputs(2, 3)
    out = RTMDetLoss()(cls, reg, GT_BOXES, GT_LABELS)
    twice = RTMDetLoss()([torch.cat([c, c]) for c in cls], [torch.cat([r, r]) for r in reg],
                         torch.cat([GT_BOXES, GT_BOXES]), torch.cat([GT_LABELS, GT_LABELS]))
    for key in ("loss_cls", "loss_bbox"):
        assert twice[key].item() == pytest.approx(out[key].item(), rel=1e-5)
    assert int(twice["num_pos"]) == 2 * int(out["num_pos"])


def test_zero_gts_give_finite_losses_and_gradients() -> None:
    cls, reg = _head_outputs(2, 3, requires_grad=True)
    out = RTMDetLoss()(cls, reg, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert out["loss_bbox"].item() == 0.0 and int(out["num_pos"]) == 0
    assert out["avg_factor"].item() == 1.0  # clamped: the cls loss is the plain QFL sum
    assert torch.isfinite(out["loss"]) and out["loss_cls"].item() > 0
    out["loss"].backward()
    assert all(torch.isfinite(t.grad).all() for t in cls + reg)


def test_gradients_flow_and_are_finite() -> None:
    cls, reg = _head_outputs(2, 3, requires_grad=True)
    RTMDetLoss()(cls, reg, GT_BOXES, GT_LABELS)["loss"].backward()
    for t in cls + reg:
        assert torch.isfinite(t.grad).all()
    assert sum(t.grad.abs().sum() for t in cls) > 0
    assert sum(t.grad.abs().sum() for t in reg) > 0


def test_autocast_bf16_outputs_give_float32_losses() -> None:
    cls, reg = _head_outputs(2, 3)
    ref = RTMDetLoss()(cls, reg, GT_BOXES, GT_LABELS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = RTMDetLoss()([c.bfloat16() for c in cls], [r.bfloat16() for r in reg],
                           GT_BOXES, GT_LABELS)
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=0.05)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        cls, reg = _head_outputs(2, 3)
        out = RTMDetLoss()([c[rank:rank + 1] for c in cls], [r[rank:rank + 1] for r in reg],
                           GT_BOXES[rank:rank + 1], GT_LABELS[rank:rank + 1])
        torch.save({k: v.detach() for k, v in out.items()}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~8 s on 2 cores, mostly importing torch
def test_ddp_average_factor_matches_single_process(tmp_path: Path) -> None:
    # DDP averages gradients over ranks, so the mean of per-rank losses must equal the
    # loss of one process holding the whole batch: that needs the cross-rank factor.
    cls, reg = _head_outputs(2, 3)
    full = RTMDetLoss()(cls, reg, GT_BOXES, GT_LABELS)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert ranks[0]["avg_factor"].item() == pytest.approx(full["avg_factor"].item() / 2)
    for key in ("loss_cls", "loss_bbox"):
        mean = sum(r[key].item() for r in ranks) / 2
        assert mean == pytest.approx(full[key].item(), rel=1e-5)


class _TinyHead(nn.Module):
    """1x1 conv class and distance predictors per level, mmdet-style (distances * stride)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in SIZES)
        self.reg = nn.ModuleList(nn.Conv2d(channels, 4, 1) for _ in SIZES)
        for conv in self.reg:
            nn.init.constant_(conv.bias, 1.0)  # start from boxes of one stride per side

    def forward(self, feats):
        cls = [conv(f) for conv, f in zip(self.cls, feats)]
        reg = [conv(f) * s for conv, f, s in zip(self.reg, feats, (8, 16, 32))]
        return cls, reg


def test_tiny_head_learns_to_fit_one_box() -> None:
    torch.manual_seed(0)
    feats = [torch.randn(1, 16, h, w) for h, w in SIZES]
    head = _TinyHead(16, 2)
    loss_fn = RTMDetLoss()
    gts, labels = torch.tensor([[[12.0, 10.0, 44.0, 50.0]]]), torch.tensor([[1]])
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    start = time.perf_counter()
    history = []
    for _ in range(100):
        out = loss_fn(*head(feats), gts, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append((out["loss_bbox"].item(), out["loss_cls"].item()))
    assert time.perf_counter() - start < 10
    first, last = history[0], history[-1]
    assert last[0] < 0.25 * first[0], history[::10]
    assert last[1] < first[1]
