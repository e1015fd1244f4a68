"""Reproducibility on one machine: the same commit, params and data train to the same weights and
the same validation mAP, with data-loading workers, at whatever thread count the suite runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.models.checkpoint import read_checkpoint
from rtmdet.training import train

from test_trainer import make_dataset


@pytest.mark.slow
def test_training_twice_gives_the_same_weights_and_map(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", n_train=16, n_valid=6, size=64, obj=(16, 30), apart=True)
    # Mosaic and mixup on (stage 2 only for the last epoch), two loader workers: every random
    # draw of the pipeline must come from the seed, not from the worker that made the batch.
    tp = TrainParams(epochs=12, batch_size=4, base_batch_size=4, lr=0.01, warmup_iters=8, stage2_epochs=3,
                     workers=2, val_interval=6, seed=0, device="cpu")
    runs = [train(DataParams(root=str(root)), ModelParams(size="nano", imgsz=64), tp, tmp_path / f"run{i}",
                  progress=False) for i in range(2)]
    for r in runs:
        r.metrics.pop("images_per_s")  # a wall time
    assert runs[0].metrics["mAP50"] > 0.01, runs[0].metrics  # a model that finds something
    assert runs[0].metrics == runs[1].metrics
    a, b = (read_checkpoint(r.last) for r in runs)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
