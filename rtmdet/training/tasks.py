"""What each `model.task` trains with: a small table, the one place the trainer looks a task up.

The trainer, loader, pipeline, checkpoints and validation are shared; a task brings its loss
(its `step_sums` reads the model's outputs and the batch entries named here) and says whether
its step has static shapes, which CUDA graphs need.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtmdet.errors import ConfigError
from rtmdet.training.losses import RTMDetLoss
from rtmdet.training.losses_ins import RTMDetInsLoss


@dataclass(frozen=True)
class TrainTask:
    """One task's training parts."""

    loss: type[RTMDetLoss]
    targets: tuple[str, ...]  # the batch entries its loss reads, moved to the device each step
    masks: bool  # the dataset is read with its instance masks
    graph_blocker: str | None  # why its step cannot be captured as a CUDA graph (None: it can)
    best_metric: str = "mAP"  # the validation metric best.pt follows


TRAIN_TASKS = {
    "detect": TrainTask(RTMDetLoss, ("boxes", "labels"), masks=False, graph_blocker=None),
    "segment": TrainTask(RTMDetInsLoss, ("boxes", "labels", "masks", "mask_centers"), masks=True,
                         graph_blocker="the segment task's mask loss runs on the positives, a number that "
                                       "changes every step", best_metric="mask_mAP"),
}


def train_task(name: str) -> TrainTask:
    """The table entry of model.task `name`, or one clear error."""
    if name not in TRAIN_TASKS:
        raise ConfigError(f"model.task {name!r}: training knows {', '.join(TRAIN_TASKS)}")
    return TRAIN_TASKS[name]
