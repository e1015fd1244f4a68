"""Classifier samples for the shared loader: the same keyed batches (TrainBatchSampler, sample_rng)
as detection, so a classifier's training is as reproducible and resumable as a detector's.

Training view, mmpretrain's CSPNeXt RSB-A1 recipe: RandomResizedCrop and a flip (class_transforms),
RandAugment (rand_augment, 2 ops at magnitude 7), then per batch either Mixup (alpha 0.2) or CutMix
(alpha 1.0), chosen with equal odds as mmpretrain's RandomBatchAugment does. The labels leave the
loader as soft targets [B, C] (one-hot, mixed). Stage 2 (the last train.stage2_epochs, as for
detection) keeps the crop and flip and leaves out RandAugment and the batch mixing.

The mixing runs in the loader workers on uint8 images, from a Generator of the batch's first key:
the same batch for any number of workers and on a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rtmdet.data.class_folders import ClassImage
from rtmdet.data.class_transforms import eval_transform, train_transform
from rtmdet.data.pipeline import SampleKey, sample_rng
from rtmdet.data.rand_augment import rand_augment
from rtmdet.errors import DataError
from rtmdet.imageio import read_image


@dataclass(frozen=True)
class ClassAugment:
    """The training augmentation of a classifier (stage 1; stage 2 drops RandAugment and mixing)."""

    rand_augment_ops: int = 2  # 0: no RandAugment
    rand_augment_magnitude: float = 7.0
    mixup_alpha: float = 0.2  # 0: no Mixup
    cutmix_alpha: float = 1.0  # 0: no CutMix


def mix_batch(images: np.ndarray, targets: np.ndarray, rng: np.random.Generator, mixup_alpha: float,
              cutmix_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Mixup or CutMix (equal odds among those with alpha > 0) of a batch with a permutation of
    itself. images [B, H, W, 3] uint8, targets [B, C] float32 -> new arrays. CutMix's weight is
    the pasted area's exact share (mmpretrain's and timm's correction)."""
    kinds = [k for k, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not kinds or len(images) < 2:
        return images, targets
    kind = kinds[int(rng.integers(len(kinds)))]
    perm = rng.permutation(len(images))
    if kind == "mixup":
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        mixed = images.astype(np.float32) * lam + images[perm].astype(np.float32) * (1 - lam)
        images = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    else:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        h, w = images.shape[1:3]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y1, y2 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x1, x2 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        images = images.copy()
        images[:, y1:y2, x1:x2] = images[perm, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    return images, (targets * lam + targets[perm] * (1 - lam)).astype(np.float32)


def batch_rng(key: SampleKey) -> np.random.Generator:
    """The Generator of a batch's mixing (from its first key; independent of the samples' own)."""
    seq = np.random.SeedSequence([key.seed, key.epoch, key.stage, key.position % (1 << 62)], spawn_key=(3,))
    return np.random.Generator(np.random.PCG64(seq))


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class ClassTrainDataset(Dataset):
    """Training views of class-folder images, indexed by the sampler's SampleKeys (whole batches)."""

    keyed = True  # build_dataloader gives it a TrainBatchSampler, as TrainDataset

    def __init__(self, images: Sequence[ClassImage], num_classes: int, imgsz: int,
                 augment: ClassAugment = ClassAugment()):
        if not images:
            raise DataError("training split: no images to train on")
        self.records, self.num_classes, self.imgsz, self.augment = list(images), num_classes, imgsz, augment

    def __len__(self) -> int:
        return len(self.records)

    def _view(self, key: SampleKey) -> np.ndarray:
        rng = sample_rng(key)
        image = train_transform(read_image(self.records[key.index].file), self.imgsz, rng)
        a = self.augment
        if key.stage == 1 and a.rand_augment_ops:
            image = rand_augment(image, rng, num_ops=a.rand_augment_ops, magnitude=a.rand_augment_magnitude)
        return image

    def __getitems__(self, keys: Sequence[SampleKey | int]) -> list[dict[str, Any]]:
        keys = [k if isinstance(k, SampleKey) else SampleKey(0, 0, 1, int(k), int(k), ()) for k in keys]
        images = np.stack([self._view(k) for k in keys])
        labels = np.array([self.records[k.index].label for k in keys], np.int64)
        targets = np.eye(self.num_classes, dtype=np.float32)[labels]
        if keys[0].stage == 1:
            images, targets = mix_batch(images, targets, batch_rng(keys[0]), self.augment.mixup_alpha,
                                        self.augment.cutmix_alpha)
        return [{"image": _chw(im), "target": torch.from_numpy(t), "label": int(lab)}
                for im, t, lab in zip(images, targets, labels)]

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        return self.__getitems__([key])[0]


class ClassValDataset(Dataset):
    """Evaluation views (eval_transform: short edge to size x 256/224, centre crop) and labels."""

    def __init__(self, images: Sequence[ClassImage], imgsz: int):
        self.records, self.imgsz = list(images), imgsz

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.records[index]
        return {"image": _chw(eval_transform(read_image(item.file), self.imgsz)), "label": item.label}


def collate_classes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: images [B, 3, S, S] uint8, labels [B] int64, and targets [B, C] when training."""
    batch = {"images": torch.stack([it["image"] for it in items]),
             "labels": torch.tensor([it["label"] for it in items], dtype=torch.int64)}
    if "target" in items[0]:
        batch["targets"] = torch.stack([it["target"] for it in items])
    return batch
