"""QAT toward the float model's own raw outputs (a detector's self-distillation under fake-quant).

The float checkpoint is the teacher of its int8 copy: on every batch both see the same input,
and the int8 model is pulled toward the float model's raw head outputs besides its labels. Each
task's outputs start with the per-level classification logits; the rest are regressions
(distances, angles, dynamic-conv kernels, mask features):

* classification: binary cross-entropy with the teacher's probabilities as soft targets, minus
  the teacher's own entropy (so a perfect copy scores 0), summed over classes and averaged over
  the prior points; a background cell's logit moving from -9 to -8 costs almost nothing, a
  confident cell's flip costs much;
* every other tensor: mean squared error divided by the teacher tensor's variance (a scale-free
  0..~1 figure per tensor, so a level of pixel distances and a level of kernels weigh alike).

The sum over tensors is averaged over the tensors of each kind and weighted by qat.distill_weight.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def flat_outputs(outputs) -> list[Tensor]:
    """A model's nested outputs (tuples and lists of tensors) in order, as one list."""
    if isinstance(outputs, Tensor):
        return [outputs]
    return [t for part in outputs for t in flat_outputs(part)]


def soft_bce(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over cells of sum over classes of BCE(student logits, sigmoid(teacher)) - H(teacher)."""
    p = teacher.float().sigmoid()
    s = student.float()
    bce = F.binary_cross_entropy_with_logits(s, p, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher.float(), p, reduction="none")
    classes = s.shape[1]
    return (bce - entropy).sum() / (s.numel() / classes)


def relative_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over the teacher tensor's variance."""
    t = teacher.float()
    return F.mse_loss(student.float(), t) / t.var().clamp_min(1e-8)


def output_distillation(student_out, teacher_out) -> Tensor:
    """The distillation loss (unweighted) of one batch: see the module docstring."""
    cls_levels = len(teacher_out[0]) if isinstance(teacher_out[0], (list, tuple)) else 1
    s_flat, t_flat = flat_outputs(student_out), flat_outputs(teacher_out)
    if len(s_flat) != len(t_flat):
        raise ValueError(f"student gives {len(s_flat)} outputs, teacher {len(t_flat)}")
    cls = sum(soft_bce(s, t) for s, t in zip(s_flat[:cls_levels], t_flat[:cls_levels])) / cls_levels
    rest = list(zip(s_flat[cls_levels:], t_flat[cls_levels:]))
    if not rest:
        return cls
    return cls + sum(relative_mse(s, t) for s, t in rest) / len(rest)
