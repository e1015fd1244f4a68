"""ExpMomentumEMA: mmdetection's momentum formula, buffers averaged, shared tensors once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtmdet.models import build_model
from rtmdet.training.ema import ExpMomentumEMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))


def test_momentum_formula() -> None:
    ema = ExpMomentumEMA(_net(), momentum=0.0002, gamma=2000)
    for steps in (1, 10, 2000, 10**6):
        expected = (1 - 0.0002) * math.exp(-(1 + steps) / 2000) + 0.0002
        assert ema.momentum_at(steps) == pytest.approx(expected, rel=1e-12)
    assert ema.momentum_at(10**7) == pytest.approx(0.0002)


def test_updates_match_a_hand_computation_for_parameters_and_buffers() -> None:
    model = _net()
    ema = ExpMomentumEMA(model, momentum=0.01, gamma=4.0)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update(model)  # step 0 copies the model (mmengine's rule)
    assert torch.equal(ema.module[0].weight, model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)

    expected_w, expected_mean = 1.0, 2.0
    for step, (w, mean) in enumerate([(3.0, 5.0), (-1.0, 0.5), (2.0, 4.0)], start=1):
        with torch.no_grad():
            model[0].weight.fill_(w)
            model[1].running_mean.fill_(mean)
            model[1].num_batches_tracked.fill_(10 * step)
        m = (1 - 0.01) * math.exp(-(1 + step) / 4.0) + 0.01
        expected_w = (1 - m) * expected_w + m * w
        expected_mean = (1 - m) * expected_mean + m * mean
        ema.update(model)
        assert torch.allclose(ema.module[0].weight, torch.full_like(model[0].weight, expected_w), atol=1e-6)
        assert torch.allclose(ema.module[1].running_mean, torch.full((3,), expected_mean), atol=1e-6)
        assert int(ema.module[1].num_batches_tracked) == 10 * step  # integer buffers are copied
    assert ema.steps == 4
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_shared_head_convs_are_averaged_once_per_step() -> None:
    model = build_model("nano", 2, image_size=64)
    ema = ExpMomentumEMA(model, momentum=0.5, gamma=1e-9)  # momentum_t == 0.5 from step 1 on
    ema.update(model)
    shared = model.bbox_head.cls_convs[0][0].conv.weight
    with torch.no_grad():
        shared.add_(1.0)
    ema.update(model)
    ema_shared = ema.module.bbox_head.cls_convs[2][0].conv.weight
    assert ema_shared is ema.module.bbox_head.cls_convs[0][0].conv.weight
    # Once: ema = 0.5 * old + 0.5 * (old + 1) = old + 0.5 (three times would give old + 0.875).
    assert torch.allclose(ema_shared, shared - 0.5, atol=1e-6)


def test_state_round_trip() -> None:
    model = _net()
    ema = ExpMomentumEMA(model)
    for _ in range(3):
        ema.update(model)
    other = ExpMomentumEMA(model)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 3
