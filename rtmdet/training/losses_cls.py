"""The classifier's loss: mmpretrain's LabelSmoothLoss (mode 'original') on soft targets.

The loader's targets are one-hot rows already mixed by Mixup/CutMix; label smoothing then moves
`smoothing` of each row's mass evenly over the classes: t' = (1 - eps) t + eps / C, and the loss
is the cross-entropy -sum(t' log softmax(logits)), averaged over the batch. With several ranks
each averages its own batch; DDP averages the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor


def _no_phase(name: str):
    return nullcontext()


class ClassifierLoss:
    """The trainer's criterion for model.task classify (the same calls as RTMDetLoss)."""

    def __init__(self, smoothing: float = 0.1):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.phase = _no_phase  # the trainer's phase timer, when profiled

    def step_sums(self, outputs: Tensor | Sequence[Tensor], targets: dict[str, Tensor],
                  priors: Tensor | None = None) -> dict[str, Tensor]:
        """The batch's summed loss: outputs the logits [B, C]; targets['targets'] soft rows [B, C]."""
        logits = outputs if isinstance(outputs, Tensor) else outputs[0]
        with self.phase("losses"), torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            soft = targets["targets"].float()
            soft = soft * (1.0 - self.smoothing) + self.smoothing / logits.shape[1]
            loss = -(soft * F.log_softmax(logits, dim=1)).sum()
        return {"loss_cls": loss, "count": logits.new_tensor(float(logits.shape[0]))}

    def normalize(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        loss = sums["loss_cls"] / sums["count"].clamp(min=1.0)
        return {"loss": loss, "loss_cls": loss, "loss_bbox": torch.zeros_like(loss)}
