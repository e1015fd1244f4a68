"""mmdetection's ExpMomentumEMA: an exponential moving average whose momentum decays with steps.

    momentum_t = (1 - m) * exp(-(1 + steps) / gamma) + m
    ema        = (1 - momentum_t) * ema + momentum_t * param     (as one lerp: ema + m * (param - ema))

applied after every optimizer step to the parameters and (update_buffers=True, RTMDet's
setting) the floating-point buffers, i.e. BatchNorm's running statistics. The first update
copies the model (mmengine's steps == 0 rule). Integer buffers (num_batches_tracked) are
copied rather than averaged.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ExpMomentumEMA:
    """An averaged copy of a model (`.module`, always in eval mode) and its update counter."""

    def __init__(self, model: nn.Module, momentum: float = 0.0002, gamma: float = 2000.0):
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1), got {momentum}")
        if gamma <= 0:
            raise ValueError(f"EMA gamma must be positive, got {gamma}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.gamma = gamma
        self.steps = 0
        self._cache_key: int | None = None

    def momentum_at(self, steps: int) -> float:
        """The weight given to the model's values at update number `steps` (>= 1)."""
        return (1.0 - self.momentum) * math.exp(-(1.0 + steps) / self.gamma) + self.momentum

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        # parameters() and buffers() visit a shared tensor once, so the head's shared convs are
        # averaged once per step (as mmengine's BaseAveragedModel does).
        return list(model.parameters()) + list(model.buffers())

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(ema floats, model floats, ema ints, model ints), cached: rebuilding the lists of a few
        hundred tensors every step costs more host time than the fused update itself."""
        key = id(model)
        if self._cache_key != key:
            ema, src = self._tensors(self.module), self._tensors(model)
            if len(ema) != len(src):
                raise ValueError(f"EMA holds {len(ema)} tensors but the model has {len(src)}")
            floats = [(e, s) for e, s in zip(ema, src) if e.is_floating_point()]
            ints = [(e, s) for e, s in zip(ema, src) if not e.is_floating_point()]
            self._cache = ([e for e, _ in floats], [s for _, s in floats], [e for e, _ in ints], [s for _, s in ints])
            self._cache_key = key
        return self._cache

    def refresh(self) -> None:
        """Forget the cached tensor lists (after moving the model or the EMA to another device/format)."""
        self._cache_key = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after optimizer.step())."""
        ema_f, src_f, ema_i, src_i = self._pairs(model)
        if self.steps == 0:
            torch._foreach_copy_(ema_f, src_f)
        else:  # ema += m * (param - ema): one fused pass over every tensor
            torch._foreach_lerp_(ema_f, src_f, self.momentum_at(self.steps))
        if ema_i:
            torch._foreach_copy_(ema_i, src_i)
        self.steps += 1

    def next_weight(self) -> float:
        """The weight the next update gives the model (1: the first update copies it)."""
        return 1.0 if self.steps == 0 else self.momentum_at(self.steps)

    @torch.no_grad()
    def apply(self, model: nn.Module, weight: torch.Tensor) -> None:
        """ema += weight * (param - ema) with the weight a device tensor and no counter: the
        update as a CUDA graph holds it (the caller advances `steps` and fills `weight`)."""
        ema_f, src_f, ema_i, src_i = self._pairs(model)
        delta = torch._foreach_sub(src_f, ema_f)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(ema_f, delta)
        if ema_i:
            torch._foreach_copy_(ema_i, src_i)

    def state_dict(self) -> dict:
        """The counter; the averaged weights are `self.module.state_dict()`."""
        return {"steps": self.steps, "momentum": self.momentum, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counter (weights are loaded into `self.module` separately)."""
        self.steps = int(state["steps"])
