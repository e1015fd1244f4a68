"""Validation during training gives the numbers of `rtmdet evaluate` for the same weights."""

from __future__ import annotations

from pathlib import Path

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


def _validate_share(rank: int, world: int, init: str, ckpt: str, root: str, out: str) -> None:
    """One rank of test_ranks_validate_their_shares: its share inferred, rank 0 scores them all."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        dataset = load_dataset(root)
        model = _confident(load_model(ckpt)[0])
        group = dist.new_group(backend="gloo")
        validator = Validator(dataset.splits["valid"], dataset, 64, torch.device("cpu"), batch_size=2, workers=0,
                              rank=rank, world_size=world, group=group)
        metrics = validator(model)
        assert (metrics is None) == (rank != 0)
        assert len(validator.index) == len(range(rank, 7, world))  # its share: every world-th image
        if rank == 0:
            Path(out).write_text(json.dumps({k: v for k, v in metrics.items() if k != "images_per_s"}))
    finally:
        dist.destroy_process_group()


def _confident(model):
    with torch.no_grad():
        for conv in model.bbox_head.rtm_cls:
            conv.bias.fill_(-1.0)
    return model


def test_ranks_validate_their_shares_and_rank0_scores_the_whole_split(tmp_path):
    import json

    import torch.multiprocessing as mp

    root = make_dataset(tmp_path / "data", n_train=2, n_valid=7, size=64, obj=(20, 40))
    dataset = load_dataset(root)
    ckpt = random_detector_checkpoint(tmp_path / "m.pt", classes=tuple(dataset.classes), image_size=64)
    alone = Validator(dataset.splits["valid"], dataset, 64, torch.device("cpu"), batch_size=2, workers=0)
    expected = {k: v for k, v in alone(_confident(load_model(ckpt)[0])).items() if k != "images_per_s"}
    assert expected["AR100"] > 0
    out = tmp_path / "metrics.json"
    mp.spawn(_validate_share, args=(2, f"file://{tmp_path / 'store'}", str(ckpt), str(root), str(out)), nprocs=2)
    assert json.loads(out.read_text()) == json.loads(json.dumps(expected))  # 7 images over 2 ranks: 4 + 3
