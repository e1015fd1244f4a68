"""AdamW with mmdetection's parameter groups, the linear lr scaling rule and the lr schedule.

RTMDet's recipe (shared/refs/recipe.json): AdamW lr 0.004 at a total batch of 256, weight
decay 0.05 on conv/linear weights only (norm_decay_mult=0, bias_decay_mult=0), a linear
warm-up from 1e-5 * lr over the first iterations, flat, then a cosine to min_lr_ratio * lr
over the second half of the epochs, stepped every iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rtmdet.config import TrainParams

WARMUP_START_FACTOR = 1e-5  # mmdet's LinearLR start_factor

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def scaled_lr(train: TrainParams, total_batch: int) -> float:
    """The linear scaling rule: lr = train.lr * total_batch / train.base_batch_size."""
    return train.lr * total_batch / train.base_batch_size


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: conv/linear weights with weight decay; norms and biases without.

    Every trainable parameter appears once, even those shared by several modules (the head's
    shared convs), like mmengine's bypass_duplicate=True.
    """
    seen: set[int] = set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    # `seen` keeps each parameter once however many modules hold it (the head's shared convs).
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            # mmengine's rule: norm layers and every bias get no decay, everything else does.
            if isinstance(module, _NORMS) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused CUDA kernel on GPUs (one launch for all tensors),
    capturable: its step counts stay on the device, so a CUDA graph can hold the update."""
    kwargs = {"fused": True, "capturable": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8, **kwargs)


@dataclass(frozen=True)
class LrSchedule:
    """lr as a pure function of the global iteration, so a resumed run needs only the counter.

    mmengine chains LinearLR (iterations [0, warmup_iters)) and an iteration-based
    CosineAnnealingLR ([cosine_begin, total_iters)) multiplicatively; the closed form is
    warm-up factor x cosine value.
    """

    base_lr: float
    warmup_iters: int
    cosine_begin: int  # first iteration of the cosine part
    total_iters: int
    min_lr: float
    warmup_start: float = WARMUP_START_FACTOR

    @classmethod
    def from_params(cls, train: TrainParams, lr: float, iters_per_epoch: int) -> "LrSchedule":
        """The schedule of a run of train.epochs epochs of iters_per_epoch iterations."""
        total = train.epochs * iters_per_epoch
        begin = int(round(train.cosine_start * train.epochs)) * iters_per_epoch
        return cls(lr, train.warmup_iters, min(begin, total), total, lr * train.min_lr_ratio)

    def warmup_factor(self, it: int) -> float:
        """LinearLR: start_factor at iteration 0, rising linearly to 1 at warmup_iters."""
        if self.warmup_iters <= 0 or it >= self.warmup_iters:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * it / self.warmup_iters

    def cosine_lr(self, it: int) -> float:
        """Flat base_lr before cosine_begin, then a half cosine reaching min_lr at total_iters."""
        if it < self.cosine_begin:
            return self.base_lr
        span = max(self.total_iters - self.cosine_begin, 1)
        t = min(it - self.cosine_begin, span)
        return self.min_lr + (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t / span)) / 2.0

    def __call__(self, it: int) -> float:
        """The lr used by global iteration `it` (0-based)."""
        return self.cosine_lr(it) * self.warmup_factor(it)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every lr a python float (a graphed step's lr is a device
    tensor): a checkpoint resumes the same way with or without CUDA graphs, on any device."""
    state = optimizer.state_dict()
    state["param_groups"] = [{**g, "lr": float(g["lr"])} for g in state["param_groups"]]
    return state


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr (a python float: no device sync, no recompilation)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def validation_due(train: TrainParams, epoch: int) -> bool:
    """Validate after 0-based `epoch`? Every val_interval epochs, every stage2_val_interval epochs
    of the stage-2 epochs (mmdetection's dynamic_intervals: every epoch), and after the last."""
    done, stage2_start = epoch + 1, max(0, train.epochs - train.stage2_epochs)
    if done == train.epochs or (train.val_interval > 0 and done % train.val_interval == 0):
        return True
    in_stage2 = epoch >= stage2_start and train.stage2_val_interval > 0
    return in_stage2 and (done - stage2_start) % train.stage2_val_interval == 0
