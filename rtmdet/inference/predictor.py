"""`Detector`: images in, `Detections` out, through one pre-process and one post-process."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from rtmdet.errors import ConfigError, DataError
from rtmdet.imageio import read_image
from rtmdet.inference.backends import Backend, TorchBackend
from rtmdet.inference.detections import Detections
from rtmdet.inference.postprocess import PostprocessConfig, postprocess_batch
from rtmdet.inference.postprocess_static import postprocess_batch_static
from rtmdet.inference.preprocess import letterbox, to_chw_tensor

ImageInput = Union[str, Path, np.ndarray]


class Detector:
    """Runs a detection backend on images of any size.

    Images are file paths or numpy arrays in **BGR** order (HxWx3 uint8, as cv2.imread returns);
    a HxW grayscale array is accepted too. Boxes come back in original-image pixels.
    """

    def __init__(
        self,
        backend: Backend,
        class_names: Sequence[str],
        image_size: int,
        postprocess: PostprocessConfig = PostprocessConfig(),
        batch_size: int = 8,
        task: str = "detect",
    ):
        """task: detect, or segment (an RTMDet-Ins torch backend; postprocess an
        InsPostprocessConfig; each Detections then carries its masks)."""
        self.task = task
        self.backend = backend
        self.class_names = list(class_names)
        self.image_size = image_size
        self.postprocess = postprocess
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", fast: bool | str = "auto", dtype: str = "fp32",
                        compile: str = "off", **kwargs) -> "Detector":
        """A torch Detector from an rtmdet or mmdetection checkpoint; kwargs: PostprocessConfig fields,
        `image_size` (default: the checkpoint's training size) and `batch_size`. fast: BatchNorm
        folded and CUDA graphs (TorchBackend's fast; auto = on CUDA devices), in `dtype` (fp32, fp16,
        bf16 on CUDA) and compiled by TorchInductor when `compile` is default or max-autotune."""
        from rtmdet.inference.postprocess_ins import InsPostprocessConfig
        from rtmdet.models.checkpoint import class_names_of, load_model

        model, ckpt = load_model(path, device, tasks=("detect", "segment"))
        image_size = kwargs.pop("image_size", None) or model.cfg.image_size
        batch_size = kwargs.pop("batch_size", 8)
        task = model.cfg.task
        post = InsPostprocessConfig(**kwargs) if task == "segment" else PostprocessConfig(**kwargs)
        names = class_names_of(ckpt, model.cfg.num_classes)
        backend = TorchBackend(model, device, fast=fast, dtype=dtype, compile=compile)
        return cls(backend, names, image_size, post, batch_size, task)

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu", **kwargs) -> "Detector":
        """A Detector over a checkpoint (from_checkpoint on `device`) or, for a .pt2, an AOTInductor
        export (on the device it was compiled for). kwargs as from_checkpoint. ONNX and TFLite files
        stay with from_export: read as checkpoints they fail with a line that names it."""
        if Path(path).suffix.lower() == ".pt2":
            return cls.from_export(path, **kwargs)
        return cls.from_checkpoint(path, device=device, **kwargs)

    @classmethod
    def from_export(cls, path: str | Path, image_size: int | None = None, batch_size: int = 8,
                    **postprocess) -> "Detector":
        """A Detector over an exported .pt2, .onnx or .tflite; classes and image size come from its
        sidecar (an image_size other than the export's is an error: its shape is fixed)."""
        from rtmdet.export.backends import detector_from_export

        detector = detector_from_export(path, batch_size=batch_size, **postprocess)
        if image_size not in (None, detector.image_size):
            raise ConfigError(f"{path}: an export for {detector.image_size} px images; its size cannot change "
                              f"to {image_size} (export again with --imgsz {image_size})")
        return detector

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
        """One image -> Detections; a list of images -> a list of Detections."""
        single = isinstance(images, (str, Path, np.ndarray))
        items = [images] if single else list(images)
        results: list[Detections] = []
        for start in range(0, len(items), self.batch_size):
            results.extend(self._run_batch(items[start : start + self.batch_size]))
        return results[0] if single else results

    def _run_batch(self, items: list[ImageInput]) -> list[Detections]:
        canvases, infos = [], []
        for item in items:
            canvas, info = letterbox(_as_bgr(item), self.image_size)
            canvases.append(canvas)
            infos.append(info)
        outputs = self.backend(to_chw_tensor(canvases))
        if self.task == "segment":
            return self._with_masks(outputs, infos)
        # On a GPU, the fixed-shape post-process (no host sync before NMS; the same result)
        post = postprocess_batch_static if outputs[0][0].is_cuda else postprocess_batch
        results = post(outputs[0], outputs[1], self.backend.strides, (self.image_size, self.image_size),
                       [i.scale_wh for i in infos], [i.ori_hw for i in infos], self.postprocess)
        return [to_detections(r, self.class_names, info.ori_hw) for r, info in zip(results, infos)]

    def _with_masks(self, outputs: tuple, infos: list) -> list[Detections]:
        """RTMDet-Ins's post-process; each Detections carries its masks as COCO RLEs."""
        from rtmdet.inference.postprocess_ins import postprocess_ins_batch

        found = []
        results = postprocess_ins_batch(outputs, self.backend.strides, (self.image_size, self.image_size),
                                        [i.scale_wh for i in infos], [i.ori_hw for i in infos], self.postprocess)
        for (*result, rles), info in zip(results, infos):
            dets = to_detections(tuple(result), self.class_names, info.ori_hw)
            dets.masks = rles
            found.append(dets)
        return found


def to_detections(result: tuple, class_names: list[str], ori_hw: tuple[int, int]) -> Detections:
    """A post-processed (boxes, scores, labels) of tensors as numpy Detections."""
    boxes, scores, labels = (t.cpu().numpy() for t in result)
    return Detections(boxes.astype(np.float32), scores.astype(np.float32), labels.astype(np.int64),
                      class_names, tuple(int(v) for v in ori_hw))


def _as_bgr(item: ImageInput) -> np.ndarray:
    if isinstance(item, (str, Path)):
        return read_image(item)
    arr = np.asarray(item)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"image array of shape {arr.shape}: expected HxWx3 BGR or HxW grayscale")
    if arr.dtype != np.uint8:
        raise DataError(f"image array of dtype {arr.dtype}: expected uint8 pixels")
    return np.ascontiguousarray(arr)
