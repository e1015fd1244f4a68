"""Rotated boxes from every format of an RTMDet-R: the torch checkpoint, its ONNX and TFLite files.

A `RotatedRunner` is the rotate task's `Detector`: any backend (rtmdet.inference.backends.TorchBackend,
rtmdet.export.backends' ONNX Runtime and TFLite ones, each returning the per-level class logits,
distances in pixels and angles) driven by the one rotated predictor,
rtmdet.evaluation.rotated_eval.RotatedPredictor: its letterbox, then the shared post-process
rtmdet.inference.rotated.postprocess_rotated. So a gap between torch and an exported file on
`score_rotated` is the file's, never the glue's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtmdet.data.dota import RotatedRecord
from rtmdet.evaluation.rotated_eval import RotatedPredictor, score_rotated, truths_of
from rtmdet.evaluation.rotated_map import RotatedDetections
from rtmdet.export import ExportError
from rtmdet.imageio import read_image
from rtmdet.inference.rotated import RotatedPostprocessConfig


class _BackendModel:
    """A backend in the place of the model RotatedPredictor drives: it takes the letterboxed uint8
    batch as it is (each backend normalizes: torch's with the model's mean/std, the exported
    graphs inside) and is always in eval mode."""

    training = False

    def __init__(self, backend):
        self.backend = backend
        self.strides = tuple(backend.strides)

    def eval(self) -> "_BackendModel":
        return self

    def train(self, mode: bool = True) -> "_BackendModel":
        return self

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8

    def __call__(self, images_uint8: torch.Tensor) -> tuple:
        return self.backend(images_uint8)


class RotatedRunner:
    """BGR images (arrays or files) -> RotatedDetections in original-image pixels, for one backend."""

    def __init__(self, backend, class_names: Sequence[str], image_size: int,
                 postprocess: RotatedPostprocessConfig = RotatedPostprocessConfig(), batch_size: int = 8):
        self.backend = backend
        self.class_names = list(class_names)
        self.image_size = image_size
        self.postprocess = postprocess
        self.batch_size = batch_size
        self.predictor = RotatedPredictor(_BackendModel(backend), image_size, "cpu", postprocess)

    def __call__(self, images: Sequence[np.ndarray | str | Path]) -> list[RotatedDetections]:
        found: list[RotatedDetections] = []
        for i in range(0, len(images), self.batch_size):
            chunk = [read_image(im) if isinstance(im, (str, Path)) else im for im in images[i : i + self.batch_size]]
            found += self.predictor(chunk)
        return found


def rotated_from_checkpoint(path: str | Path, device: str = "cpu", batch_size: int = 8,
                            **postprocess) -> RotatedRunner:
    """A runner over an RTMDet-R checkpoint in torch; postprocess: RotatedPostprocessConfig fields."""
    from rtmdet.inference.backends import TorchBackend
    from rtmdet.models.checkpoint import class_names_of, load_model

    model, ckpt = load_model(path, device, tasks=("rotate",))
    return RotatedRunner(TorchBackend(model, device), class_names_of(ckpt, model.cfg.num_classes),
                         model.cfg.image_size, RotatedPostprocessConfig(**postprocess), batch_size)


def rotated_from_export(path: str | Path, class_names: Sequence[str] | None = None, threads: int = 2,
                        batch_size: int = 8, **postprocess) -> RotatedRunner:
    """A runner over an exported RTMDet-R (.onnx or .tflite); classes and image size from its sidecar."""
    from rtmdet.export.backends import open_backend

    backend = open_backend(path, threads)
    if not backend.meta.angle_outputs:
        raise ExportError(f"{path}: a {backend.meta.task} export (no angle outputs), not an RTMDet-R's; "
                          "run it with rtmdet.export.detector_from_export")
    names = list(class_names) if class_names is not None else backend.meta.classes
    if len(names) != len(backend.meta.classes):
        raise ExportError(f"{path}: {len(names)} class names given for a model with "
                          f"{len(backend.meta.classes)} classes")
    return RotatedRunner(backend, names, backend.meta.image_size, RotatedPostprocessConfig(**postprocess), batch_size)


def score_runner(runner: RotatedRunner, records: Sequence[RotatedRecord], classes: Sequence[str]) -> dict[str, Any]:
    """score_rotated of the runner's detections on `records` (mAP = mAP50:95, mAP50, mAP75, ...),
    plus num_images and images_per_s."""
    start = time.perf_counter()
    detections = runner([r.file for r in records])
    seconds = time.perf_counter() - start
    scored = score_rotated(detections, truths_of(records), classes)
    return {**scored, "num_images": len(records), "images_per_s": len(records) / max(seconds, 1e-9)}
