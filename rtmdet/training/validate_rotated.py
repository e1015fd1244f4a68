"""Validation of a rotated-box model (RTMDet-R) during training: the val split's detections ->
DOTA-style rotated mAP (rtmdet.evaluation.rotated_eval.score_rotated: mAP is mAP50:95).

The same calls as the detectors' Validator (rtmdet.training.validate): `__call__`, `submit` /
`collect`, `seconds`, `close`. Images are letterboxed once and kept as uint8 batches when they
fit in `cache_bytes`. With several ranks each infers every world_size-th image and rank 0
gathers the detections.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rtmdet.data.dota import RotatedRecord
from rtmdet.evaluation.rotated_eval import RotatedPredictor, score_rotated, truths_of
from rtmdet.evaluation.rotated_map import RotatedDetections
from rtmdet.imageio import read_image
from rtmdet.inference.rotated import RotatedPostprocessConfig

CACHE_BYTES = 2 << 30


class RotatedValidator:
    """Scores an RTMDet-R on one split; build once per training run."""

    def __init__(self, records: Sequence[RotatedRecord], classes: list[str], imgsz: int, device: torch.device,
                 batch_size: int = 16, cfg: RotatedPostprocessConfig = RotatedPostprocessConfig(),
                 cache_bytes: int = CACHE_BYTES, rank: int = 0, world_size: int = 1, group: Any = None):
        self.records, self.classes, self.imgsz, self.device = list(records), list(classes), imgsz, device
        self.batch_size, self.cfg = batch_size, cfg
        self.rank, self.world_size, self.group = rank, world_size, group
        self.share = self.records[rank::world_size]
        self.truths = truths_of(self.records)
        self.cache: list[tuple[torch.Tensor, list[tuple[float, float]]]] | None = None
        if len(self.share) * 3 * imgsz * imgsz <= cache_bytes:
            self.cache = list(self._batches(RotatedPredictor(None, imgsz, device)))
        self.seconds: dict[str, float] = {}

    def _batches(self, predictor: RotatedPredictor) -> Iterator[tuple[torch.Tensor, list[tuple[float, float]]]]:
        for i in range(0, len(self.share), self.batch_size):
            yield predictor.canvases([read_image(r.file) for r in self.share[i:i + self.batch_size]])

    def infer(self, model: nn.Module) -> list[RotatedDetections]:
        """This rank's share's detections, in the share's order."""
        predictor = RotatedPredictor(model, self.imgsz, self.device, self.cfg)
        start = time.perf_counter()
        out: list[RotatedDetections] = []
        for batch, scales in (self.cache if self.cache is not None else self._batches(predictor)):
            out += predictor.predict_batch(batch, scales)
        seconds = time.perf_counter() - start
        self.seconds = {"inference": seconds, "model": seconds, "postprocess": 0.0}  # the post-process is inside
        return out

    def _gathered(self, detections: list[RotatedDetections]) -> list[RotatedDetections] | None:
        if self.world_size == 1:
            return detections
        shares = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(detections, shares, dst=0, group=self.group)
        if shares is None:
            return None
        full: list[Any] = [None] * len(self.records)
        for r, share in enumerate(shares):
            full[r::self.world_size] = share
        return full

    def _score(self, detections: list[RotatedDetections]) -> dict[str, Any]:
        start = time.perf_counter()
        metrics = score_rotated(detections, self.truths, self.classes)
        self.seconds["scoring"] = time.perf_counter() - start
        metrics["images_per_s"] = len(self.records) / max(self.seconds["inference"], 1e-9)
        return metrics

    def __call__(self, model: nn.Module) -> dict[str, Any] | None:
        detections = self._gathered(self.infer(model))
        return None if detections is None else self._score(detections)

    def submit(self, model: nn.Module) -> Future | None:
        result = self(model)
        if result is None:
            return None
        future: Future = Future()
        future.set_result(result)
        return future

    def collect(self, future: Future) -> dict[str, Any]:
        return future.result()

    def close(self) -> None:
        self.cache = None
