"""model.task classify on the shared trainer: batch mixing, the loss, the keyed dataset, a whole run."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.data.class_folders import load_class_folders
from rtmdet.data.class_loader import ClassAugment, ClassTrainDataset, collate_classes, mix_batch
from rtmdet.data.loader import build_dataloader, set_epochs
from rtmdet.data.pipeline import SampleKey
from rtmdet.errors import ConfigError
from rtmdet.training import train
from rtmdet.training.losses_cls import ClassifierLoss


def make_colors(root: Path, train: int = 12, val: int = 4, size: tuple[int, int] = (48, 64)) -> Path:
    """Three classes of noisy red, green and blue images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(("blue", "green", "red")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
                image[..., c] += 180  # BGR: blue is channel 0
                cv2.imwrite(str(folder / f"{i}.png"), image)
    return root


def test_mixup_blends_images_and_targets_with_one_weight():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    targets = np.eye(6, dtype=np.float32)  # one class per image: each row names its partner
    mixed, soft = mix_batch(images, targets, np.random.default_rng(5), mixup_alpha=0.2, cutmix_alpha=0.0)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    # Each row is lam x its own one-hot + (1 - lam) x a partner's: recover lam and the partner, check the pixels.
    lams = set()
    for i in range(6):
        lam = soft[i, i]
        j = int(np.argmax(np.where(np.arange(6) == i, -1, soft[i]))) if lam < 1 else i
        lams.add(round(float(max(lam, 1 - lam)), 5))
        np.testing.assert_allclose(mixed[i], lam * images[i].astype(float) + (1 - lam) * images[j], atol=0.51)
    assert len(lams - {1.0}) == 1  # one weight for the whole batch


def test_cutmix_weight_is_the_pasted_area_share():
    images = np.stack([np.full((20, 30, 3), v, np.uint8) for v in (10, 200, 90, 150)])
    targets = np.eye(4, dtype=np.float32)
    for seed in range(10):
        mixed, soft = mix_batch(images, targets, np.random.default_rng(seed), mixup_alpha=0.0, cutmix_alpha=1.0)
        for i in range(4):
            own = (mixed[i, ..., 0] == images[i, 0, 0, 0]).mean()
            assert soft[i, i] == pytest.approx(own if soft[i, i] < 1 else 1.0, abs=1e-6)
            np.testing.assert_allclose(soft[i].sum(), 1.0, rtol=1e-6)


def test_no_mixing_with_both_alphas_zero():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    targets = np.eye(4, dtype=np.float32)
    out, soft = mix_batch(images, targets, np.random.default_rng(0), 0.0, 0.0)
    assert out is images and soft is targets


def test_loss_is_label_smoothed_cross_entropy():
    logits = torch.randn(5, 4)
    labels = torch.tensor([0, 3, 1, 1, 2])
    sums = ClassifierLoss(0.1).step_sums(logits, {"targets": F.one_hot(labels, 4).float()})
    loss = ClassifierLoss(0.1).normalize(sums)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(loss["loss"], expected)
    assert float(loss["loss_bbox"]) == 0.0


def test_train_batches_are_keyed_mixed_in_stage_1_and_plain_in_stage_2(tmp_path):
    dataset = load_class_folders(make_colors(tmp_path / "d"))
    ds = ClassTrainDataset(dataset.splits["train"].images, 3, 32)
    keys = [SampleKey(0, 2, 1, p, 7 * p % len(ds), ()) for p in range(6)]
    first, again = collate_classes(ds.__getitems__(keys)), collate_classes(ds.__getitems__(keys))
    assert torch.equal(first["images"], again["images"]) and torch.equal(first["targets"], again["targets"])
    assert first["images"].shape == (6, 3, 32, 32) and first["images"].dtype == torch.uint8
    assert (first["targets"].max(1).values < 1).any()  # stage 1 mixes
    plain = collate_classes(ds.__getitems__([SampleKey(0, 2, 2, p, 7 * p % len(ds), ()) for p in range(6)]))
    assert torch.equal(plain["targets"], F.one_hot(plain["labels"], 3).float())  # stage 2 does not
    no_aug = ClassTrainDataset(dataset.splits["train"].images, 3, 32, ClassAugment(0, 0, 0.0, 0.0))
    assert torch.equal(collate_classes(no_aug.__getitems__(keys))["targets"], F.one_hot(first["labels"], 3).float())


def test_loader_batches_do_not_depend_on_the_worker_count(tmp_path):
    dataset = load_class_folders(make_colors(tmp_path / "d", train=6))
    ds = ClassTrainDataset(dataset.splits["train"].images, 3, 32)

    def batches(workers: int) -> list[torch.Tensor]:
        loader = build_dataloader(ds, 4, num_workers=workers, seed=3, collate_fn=collate_classes)
        set_epochs(loader, 0, 2, 1)
        try:
            return [b["images"] for b in loader]
        finally:
            loader.close()

    a, b = batches(0), batches(2)
    assert len(a) == 2 * (18 // 4) and all(torch.equal(x, y) for x, y in zip(a, b))


def _params(epochs: int, **train) -> TrainParams:
    base = dict(epochs=epochs, batch_size=4, lr=0.004, base_batch_size=4, warmup_iters=2, stage2_epochs=epochs,
                val_interval=1, stage2_val_interval=1, workers=0, device="cpu", ckpt_interval_s=0)
    return TrainParams(**{**base, **train})


def test_a_classifier_learns_resumes_and_hands_its_backbone_to_a_detector(tmp_path, caplog):
    from rtmdet.export.classify import score_classifier
    from rtmdet.models.checkpoint import load_classifier
    from rtmdet.training.build import build_train_model

    root = make_colors(tmp_path / "colors")
    model = ModelParams(size="nano", imgsz=64, task="classify")
    with caplog.at_level(logging.INFO, logger="rtmdet"):
        result = train(DataParams(root=str(root)), model, _params(20), tmp_path / "run", progress=False)
    assert result.best_mAP == 1.0  # top-1 on val: the colours are learnt
    assert "top1 1.0000" in caplog.text and "bbox" not in caplog.text.split("epoch 20/20")[1].split("\n")[0]
    classifier, ckpt = load_classifier(result.best)
    assert ckpt["meta"]["dataset_meta"]["classes"] == ["blue", "green", "red"]
    assert ckpt["meta"]["params"]["model"]["task"] == "classify" and ckpt["meta"]["mAP"] == 1.0
    assert score_classifier(result.best, root).top1 == 1.0  # the evaluator agrees with training's validation
    again = train(DataParams(root=str(root)), model, _params(20), tmp_path / "run", progress=False)
    assert again.already_finished

    # model.init: the trained classifier's backbone starts a detector (and a classifier of other classes).
    detector = build_train_model(ModelParams(size="nano", imgsz=64, init=str(result.best)), 5, seed=0)
    for k, v in classifier.backbone.state_dict().items():
        assert torch.equal(detector.backbone.state_dict()[k], v), k
    from rtmdet.training.task_parts import ClassParts

    other = ClassParts().build_model(ModelParams(size="nano", imgsz=64, task="classify", init=str(result.best)), 7, 0)
    assert torch.equal(other.backbone.stem[0].conv.weight, classifier.backbone.stem[0].conv.weight)
    assert other.head.fc.out_features == 7


def test_classify_rejects_what_it_cannot_use(tmp_path):
    root = make_colors(tmp_path / "colors", train=2, val=1)
    model = ModelParams(size="nano", imgsz=64, task="classify")
    with pytest.raises(ConfigError, match="train.teacher: distillation is for detectors"):
        train(DataParams(root=str(root)), model, _params(1, teacher="tiny"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="data.num_classes is 4 but"):
        train(DataParams(root=str(root), num_classes=4), model, _params(1), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="model.normalization applies to detectors"):
        train(DataParams(root=str(root)), ModelParams(size="nano", imgsz=64, task="classify", normalization="unit"),
              _params(1), tmp_path / "c", progress=False)
