"""Feature distillation from a larger RTMDet teacher into a student, as in MMRazor's RTMDet configs.

What is distilled: the neck's three output convolutions (the conv of each `neck.out_convs[i]`,
before its BatchNorm and activation), level by level, for teacher and student alike.

* The teacher's maps are normalized per channel over the batch (BatchNorm without affine or
  running statistics): zero mean, unit variance, as PKD does.
* The student's maps go through an adapter, a 1x1 conv and a BatchNorm, to the teacher's channels;
  the adapters train with the student and are thrown away afterwards.
* Each level's loss is the channel-wise divergence (CWD): per image and channel, the softmax over
  positions of the teacher's map against the student's, KL(teacher || student) * tau^2, averaged
  over images and channels. Weighted by train.distill_weight per level.

The teacher runs in eval mode under no_grad (with the student's autocast). Its input is the
student's: the same normalized batch at the same size, so the maps line up cell for cell.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtmdet.errors import ConfigError
from rtmdet.models import RTMDet


def channel_wise_divergence(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """CWD of [N, C, H, W] maps: sum over (n, c) of KL(softmax(t/tau) || softmax(s/tau)) over the
    H*W positions, times tau^2, divided by N*C."""
    if student.shape != teacher.shape:
        raise ValueError(f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ")
    n, c = student.shape[:2]
    s = student.float().flatten(2) / tau
    t = teacher.float().flatten(2) / tau
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum()
    return kl * tau**2 / (n * c)


def normalize_channels(x: Tensor) -> Tensor:
    """Each channel to zero mean and unit variance over batch and positions (PKD's normalization)."""
    return F.batch_norm(x.float(), None, None, training=True, eps=1e-5)


def neck_taps(model: RTMDet) -> list[nn.Module]:
    """The modules whose outputs are distilled: each neck output's convolution (before BN, act)."""
    return [conv.conv for conv in model.neck.out_convs]


class Recorder:
    """Keeps the latest outputs of some modules (forward hooks), in their order."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def store(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.outputs[i] = output
        return store

    def take(self) -> list[Tensor]:
        """The recorded outputs (and forget them, so a stale map is never used twice)."""
        if any(o is None for o in self.outputs):
            raise RuntimeError("a distilled module did not run in the last forward")
        out, self.outputs = list(self.outputs), [None] * len(self.outputs)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Adapters(nn.Module):
    """Per level: the student's channels to the teacher's, 1x1 conv (no bias) + BatchNorm."""

    def __init__(self, student_channels: list[int], teacher_channels: list[int]):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
            for cs, ct in zip(student_channels, teacher_channels))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [adapt(x) for adapt, x in zip(self.levels, feats)]


def _out_channels(model: RTMDet) -> list[int]:
    return [conv.conv.out_channels for conv in model.neck.out_convs]


class Distiller(nn.Module):
    """The frozen teacher, the hooks on both necks, the trainable adapters and the loss.

    Usage per step: run the student's forward (its taps are recorded), then `loss(x)` runs the
    teacher on the same input and returns the weighted sum of the levels' CWD."""

    def __init__(self, teacher: RTMDet, student: RTMDet, weight: float = 1.0, tau: float = 1.0):
        super().__init__()
        self.adapters = Adapters(_out_channels(student), _out_channels(teacher))
        self.weight, self.tau = weight, tau
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule (not trained, not saved)
        self.student_taps = Recorder(neck_taps(student))
        self.teacher_taps = Recorder(neck_taps(teacher))

    def loss(self, x: Tensor) -> Tensor:
        """Distillation loss for the student forward just run on `x` (same autocast as it)."""
        with torch.no_grad():
            self.teacher[0](x)
        teacher = self.teacher_taps.take()
        student = self.adapters(self.student_taps.take())
        total = sum(channel_wise_divergence(s, normalize_channels(t), self.tau) for s, t in zip(student, teacher))
        return total * self.weight


def load_teacher(path: str | Path, class_names: list[str]) -> RTMDet:
    """The teacher detector of a checkpoint, checked against the student's data: the same classes
    in the same order (else one line naming the file and both lists)."""
    from rtmdet.models.checkpoint import class_names_of, load_model

    model, ckpt = load_model(path)
    names = class_names_of(ckpt, model.cfg.num_classes)
    if model.cfg.num_classes != len(class_names) or (names != list(class_names) and not names[0].startswith("class_")):
        raise ConfigError(f"train.teacher {path}: its classes ({', '.join(names)}) are not the dataset's "
                          f"({', '.join(class_names)}); a teacher must be trained on the same classes")
    return model
