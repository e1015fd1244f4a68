"""Training: assigner, losses, optimizer/schedule, EMA and the resumable (multi-GPU) trainer.

`train`, `TrainResult` and `TrainingError` load lazily, so importing the losses stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "TrainingError", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rtmdet.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'rtmdet.training' has no attribute {name!r}")
