"""Validation of a classifier during training: the val split's logits -> top-1, top-5, per-class.

The same calls as the detectors' Validator (rtmdet.training.validate): `__call__`, `submit` /
`collect`, `seconds`, `close`. Scoring a split's logits takes milliseconds, so `submit` scores at
once and hands back a finished future. Images are decoded once (eval_transform) and kept as uint8
batches when they fit in `cache_bytes`. With several ranks each infers every world_size-th image
and rank 0 gathers the logits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rtmdet.data.class_folders import ClassImage
from rtmdet.data.class_loader import ClassValDataset, collate_classes
from rtmdet.data.loader import build_dataloader
from rtmdet.evaluation.classification import classification_result
from rtmdet.training.validate import BatchCache

CACHE_BYTES = 2 << 30


class ClassValidator:
    """Scores a classifier on one split; build once per training run."""

    def __init__(self, images: Sequence[ClassImage], classes: list[str], imgsz: int, device: torch.device,
                 batch_size: int = 64, workers: int = 2, cache_bytes: int = CACHE_BYTES, rank: int = 0,
                 world_size: int = 1, group: Any = None):
        self.classes, self.device, self.rank, self.world_size, self.group = classes, device, rank, world_size, group
        self.labels = np.array([im.label for im in images], np.int64)
        self.index = np.arange(rank, len(images), world_size)
        share = list(images)[rank::world_size]
        fits = len(share) * 3 * imgsz * imgsz <= cache_bytes
        self.loader = build_dataloader(ClassValDataset(share, imgsz), batch_size, num_workers=workers,
                                       persistent_workers=not fits and workers > 0, collate_fn=collate_classes)
        self.batches = BatchCache(self.loader, keep=fits)
        self.seconds: dict[str, float] = {}
        if fits:
            for _ in self.batches:
                pass

    @torch.inference_mode()
    def infer(self, model: nn.Module) -> np.ndarray:
        """This rank's share's logits [n, C] (float32), in the share's order."""
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        parts = []
        for batch in self.batches:
            images = batch["images"].to(self.device, non_blocking=True)
            parts.append(model(model.normalize(images)).float())
        logits = torch.cat(parts).cpu().numpy() if parts else np.zeros((0, len(self.classes)), np.float32)
        model.train(was_training)
        seconds = time.perf_counter() - start
        self.seconds = {"inference": seconds, "model": seconds, "postprocess": 0.0}
        return logits

    def _gathered(self, logits: np.ndarray) -> np.ndarray | None:
        if self.world_size == 1:
            return logits
        shares = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(logits, shares, dst=0, group=self.group)
        if shares is None:
            return None
        full = np.zeros((len(self.labels), len(self.classes)), np.float32)
        for r, share in enumerate(shares):
            full[np.arange(r, len(self.labels), self.world_size)] = share
        return full

    def _score(self, logits: np.ndarray) -> dict[str, Any]:
        start = time.perf_counter()
        metrics = classification_result(logits, self.labels, self.classes).metrics()
        self.seconds["scoring"] = time.perf_counter() - start
        metrics["images_per_s"] = len(self.labels) / max(self.seconds["inference"], 1e-9)
        return metrics

    def __call__(self, model: nn.Module) -> dict[str, Any] | None:
        logits = self._gathered(self.infer(model))
        return None if logits is None else self._score(logits)

    def submit(self, model: nn.Module) -> Future | None:
        logits = self._gathered(self.infer(model))
        if logits is None:
            return None
        future: Future = Future()
        future.set_result(self._score(logits))
        return future

    def collect(self, future: Future) -> dict[str, Any]:
        return future.result()

    def close(self) -> None:
        self.loader.close()
