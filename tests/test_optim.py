"""Param groups (decay only on conv/linear weights, shared convs once), lr scaling and schedule."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from rtmdet.config import TrainParams
from rtmdet.models import build_model
from rtmdet.training.optim import LrSchedule, build_optimizer, param_groups, scaled_lr, set_lr, validation_due


def test_linear_scaling_rule() -> None:
    p = TrainParams(lr=0.004, base_batch_size=256)
    assert scaled_lr(p, 256) == pytest.approx(0.004)
    assert scaled_lr(p, 32) == pytest.approx(0.0005)
    assert scaled_lr(p, 64) == pytest.approx(2 * scaled_lr(p, 32))  # 2 GPUs x 32 = twice the lr


def _schedule(**kw) -> LrSchedule:
    p = replace(TrainParams(), epochs=10, warmup_iters=20, cosine_start=0.5, min_lr_ratio=0.05, **kw)
    return LrSchedule.from_params(p, lr=0.01, iters_per_epoch=10)


def test_warmup_starts_at_1e5_and_rises_linearly_per_iteration() -> None:
    s = _schedule()
    assert s(0) == pytest.approx(0.01 * 1e-5)
    assert s(10) == pytest.approx(0.01 * (1e-5 + (1 - 1e-5) * 0.5))
    # Stepped every iteration: consecutive iterations differ by the same amount during warm-up.
    steps = [s(i + 1) - s(i) for i in range(19)]
    assert max(steps) == pytest.approx(min(steps))
    assert s(20) == pytest.approx(0.01)


def test_flat_then_cosine_to_min_lr() -> None:
    s = _schedule()
    assert s.cosine_begin == 50 and s.total_iters == 100
    assert all(s(i) == pytest.approx(0.01) for i in range(20, 51))
    assert s(75) == pytest.approx(0.0005 + (0.01 - 0.0005) * 0.5)  # half way down the cosine
    assert s(100) == pytest.approx(0.01 * 0.05)  # the end value: min_lr_ratio * lr
    assert s(99) > s(100) and s(99) - s(100) < 1e-5
    lrs = [s(i) for i in range(50, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing, every iteration


def test_warmup_overlapping_cosine_multiplies() -> None:
    p = replace(TrainParams(), epochs=2, warmup_iters=30, cosine_start=0.5, min_lr_ratio=0.1)
    s = LrSchedule.from_params(p, lr=1.0, iters_per_epoch=10)
    assert s(15) == pytest.approx(s.warmup_factor(15) * s.cosine_lr(15))
    assert s.cosine_lr(15) < 1.0 and s.warmup_factor(15) < 1.0


def test_norms_and_biases_have_no_decay_and_every_parameter_appears_once() -> None:
    model = build_model("tiny", 3, image_size=64)  # tiny: channel attention (a conv with a bias) too
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))  # nothing twice, although the head shares its convs
    assert set(ids) == {id(p) for p in model.parameters()}  # and nothing missing
    names = {id(p): n for n, p in model.named_parameters()}
    for p in no_decay["params"]:
        assert names[id(p)].endswith(("bn.weight", "bn.bias", ".bias")), names[id(p)]
    for p in decay["params"]:
        assert names[id(p)].endswith("weight") and p.ndim == 4, names[id(p)]
    shared = model.bbox_head.cls_convs[1][0].conv.weight
    assert shared is model.bbox_head.cls_convs[0][0].conv.weight and id(shared) in ids


def test_frozen_parameters_are_left_out_and_lr_is_set_everywhere() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, 0.1, 0.05, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in opt.param_groups[0]["params"]] == ["2.weight"]
    assert sorted(names[id(p)] for p in opt.param_groups[1]["params"]) == ["0.bias", "1.bias", "1.weight", "2.bias"]
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_weight_decay_is_decoupled_and_skips_norms() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=True), nn.BatchNorm1d(2))
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay can move a parameter
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.1 * 0.5))
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name], before[name]), name
    assert math.isclose(opt.param_groups[0]["weight_decay"], 0.5)


def test_validation_schedule_follows_mmdetection_dynamic_intervals() -> None:
    p = replace(TrainParams(), epochs=30, val_interval=10, stage2_epochs=5, stage2_val_interval=1)
    due = [e + 1 for e in range(30) if validation_due(p, e)]
    assert due == [10, 20, 26, 27, 28, 29, 30]
    p = replace(p, val_interval=0, stage2_val_interval=0)
    assert [e + 1 for e in range(30) if validation_due(p, e)] == [30]  # always after the last epoch
