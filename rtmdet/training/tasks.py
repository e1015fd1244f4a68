"""What each `model.task` trains with: a small table, the one place the trainer looks a task up.

The trainer, loader, sampler, checkpoints and the step are shared; a task brings its loss (its
`step_sums` reads the model's outputs and the batch entries named here), says whether its step
has static shapes (which CUDA graphs need), which validation numbers it reports, and its family's
parts (rtmdet.training.task_parts: data, model, validator, checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rtmdet.errors import ConfigError
from rtmdet.training.losses import RTMDetLoss
from rtmdet.training.losses_cls import ClassifierLoss
from rtmdet.training.losses_ins import RTMDetInsLoss
from rtmdet.training.losses_rotated import RotatedRTMDetLoss
from rtmdet.training.task_parts import BoxParts, ClassParts, RotParts


@dataclass(frozen=True)
class TrainTask:
    """One task's training parts."""

    loss: Callable[[Any, Any], Any]  # (model, TrainParams) -> the criterion
    targets: tuple[str, ...]  # the batch entries its loss reads, moved to the device each step
    masks: bool  # the dataset is read with its instance masks
    graph_blocker: str | None  # why its step cannot be captured as a CUDA graph (None: it can)
    best_metric: str = "mAP"  # the validation metric best.pt follows
    val_metrics: tuple[str, ...] = ("mAP", "mAP50")  # logged as val/<name> (dvclive) and in the epoch line
    loss_parts: tuple[str, ...] = ("cls", "bbox")  # the loss_<part> means in the epoch line
    parts: Any = BoxParts()


TRAIN_TASKS = {
    "detect": TrainTask(lambda net, p: RTMDetLoss(net.strides, topk=p.assigner_topk), ("boxes", "labels"),
                        masks=False, graph_blocker=None),
    "segment": TrainTask(lambda net, p: RTMDetInsLoss(net.strides, topk=p.assigner_topk),
                         ("boxes", "labels", "masks", "mask_centers"), masks=True,
                         graph_blocker="the segment task's mask loss runs on the positives, a number that "
                                       "changes every step", best_metric="mask_mAP",
                         val_metrics=("mAP", "mAP50", "mask_mAP", "mask_mAP50"), loss_parts=("cls", "bbox", "mask")),
    "rotate": TrainTask(lambda net, p: RotatedRTMDetLoss(net.strides, topk=p.assigner_topk), ("rboxes", "labels"),
                        masks=False, graph_blocker="the rotate task's assigner and box loss run on the candidate "
                                                   "pairs and positives, numbers that change every step",
                        val_metrics=("mAP", "mAP50", "mAP75"), parts=RotParts()),
    "classify": TrainTask(lambda net, p: ClassifierLoss(), ("targets",), masks=False,
                          graph_blocker="the classify step is not captured as CUDA graphs yet", best_metric="top1",
                          val_metrics=("top1", "top5"), loss_parts=(), parts=ClassParts()),
}


def train_task(name: str) -> TrainTask:
    """The table entry of model.task `name`, or one clear error."""
    if name not in TRAIN_TASKS:
        raise ConfigError(f"model.task {name!r}: training knows {', '.join(TRAIN_TASKS)}")
    return TRAIN_TASKS[name]
