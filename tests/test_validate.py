"""Validation during training gives the numbers of `rtmdet evaluate` for the same weights."""

from __future__ import annotations

import torch

from rtmdet.data.coco import load_dataset
from rtmdet.evaluation.coco_eval import evaluate_detector
from rtmdet.inference import Detector
from rtmdet.models.checkpoint import load_model
from rtmdet.training.validate import Validator

from conftest import random_detector_checkpoint
from test_trainer import make_dataset


def test_validator_equals_the_evaluate_path(tmp_path):
    root = make_dataset(tmp_path / "data", n_train=2, n_valid=7, size=64, obj=(20, 40))
    dataset = load_dataset(root)
    ckpt = random_detector_checkpoint(tmp_path / "m.pt", classes=tuple(dataset.classes), image_size=64)
    model = load_model(ckpt)[0]
    with torch.no_grad():
        for conv in model.bbox_head.rtm_cls:
            conv.bias.fill_(-1.0)  # confident enough to keep many boxes: a non-trivial score
    split = dataset.splits["valid"]
    # batch 3 over 7 images: a last, partial batch too; workers 0 and the cache on.
    validator = Validator(split, dataset, 64, torch.device("cpu"), batch_size=3, workers=0)
    model.train()
    first, again = validator(model), validator(model)
    assert model.training  # the caller's mode is kept
    expected = evaluate_detector(_detector_of(model, dataset.classes), split, dataset, progress=False).to_metrics()
    for metrics in (first, again):
        got = {k: v for k, v in metrics.items() if k != "images_per_s"}
        assert got == {k: v for k, v in expected.items() if k != "images_per_s"}
    assert expected["AR100"] > 0 and expected["num_images"] == 7
    assert validator.cached and len(validator.cache) == 3


def _detector_of(model, classes):
    from rtmdet.inference.backends import TorchBackend

    return Detector(TorchBackend(model, "cpu"), classes, 64, batch_size=3)
