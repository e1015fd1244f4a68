"""Inference backends: each turns a uint8 BGR batch into raw per-level head outputs.

A backend is small: `__call__(images_uint8 [N, 3, S, S]) -> (cls_scores, bbox_preds)` with, per
level, class logits [N, C, H, W] and distances in pixels [N, 4, H, W] as torch tensors (a segment
model's torch backend adds its kernels [N, 169, H, W] per level and the mask features [N, 8, S/8,
S/8]). Everything before (letterbox) and after (decode, NMS, masks) is shared in `Detector`, so
backends differ only here. The ONNX Runtime and TFLite backends live in rtmdet.export.backends;
the AOTInductor one (`.pt2`, torch's own runtime) lives here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch

if TYPE_CHECKING:
    from rtmdet.export.sidecar import ExportMeta
    from rtmdet.models.detector import RTMDet

ZIP_MAGIC = b"PK\x03\x04"  # a .pt2 package is a zip archive


class Backend(Protocol):
    """What a Detector needs from a runtime."""

    strides: tuple[int, ...]

    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...


class TorchBackend:
    """Runs an RTMDet module; normalization uses the model's own mean/std.

    fast: BatchNorm folded, channels_last and, on CUDA, `dtype` (fp32, fp16, bf16) weights and the
    forward replayed as a CUDA graph (rtmdet.inference.fast); "auto" = on for CUDA devices; compile:
    the fast path's TorchInductor mode (off, default, max-autotune). half: the eager model under
    fp16 autocast on CUDA (ignored when fast).
    """

    def __init__(self, model: "RTMDet", device: str | torch.device = "cpu", half: bool = False,
                 fast: bool | str = False, dtype: str = "fp32", compile: str = "off"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.strides = tuple(model.strides)
        self.half = half and self.device.type == "cuda"
        if fast == "auto":
            fast = self.device.type == "cuda"
        self.fast = None
        if fast:
            from rtmdet.inference.fast import FastForward

            self.fast = FastForward(self.model, self.device, dtype, compile=compile)

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.fast is not None:
            return self.fast(images_uint8)
        x = self.model.normalize(images_uint8.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            outputs = self.model(x)
        return tuple(o.float() if isinstance(o, torch.Tensor) else [t.float() for t in o] for o in outputs)


class AotiBackend:
    """Runs an AOTInductor package (`rtmdet export --format aoti`, a `.pt2`) on the device it was
    compiled for, one image per call (its input shape is static); its positional outputs are
    matched to levels by the sidecar's `outputs` names."""

    def __init__(self, path: str | Path, meta: "ExportMeta | None" = None):
        from rtmdet.export import ExportError
        from rtmdet.export.sidecar import meta_path, read_meta

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: exported model not found")
        self.meta = meta or read_meta(self.path)
        if self.meta.format != "aoti":
            raise ExportError(f"{meta_path(self.path)}: the sidecar of a {self.meta.format} export, not of an "
                              "AOTInductor package (format aoti)")
        self.strides = tuple(self.meta.strides)
        self.device = torch.device(self.meta.device or "cpu")
        self.runner = load_aoti_package(self.path, self.device.type)
        self._check_outputs()

    def outputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """One float32 [1, 3, S, S] canvas -> the package's outputs by name, on the CPU."""
        outs = self.runner(image.to(self.device))
        return {name: out.float().cpu() for name, out in zip(self.meta.outputs, outs)}

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from rtmdet.export.backends import to_level_maps

        per_image = [self.outputs(images_uint8[i : i + 1].float()) for i in range(len(images_uint8))]
        return to_level_maps({n: torch.cat([p[n] for p in per_image]).numpy() for n in self.meta.outputs}, self.meta)

    @torch.inference_mode()
    def _check_outputs(self) -> None:
        """The sidecar against the package: one run on a padding-only canvas, so that a sidecar of
        another export fails here in one line, not later as wrong boxes."""
        from rtmdet.export import ExportError
        from rtmdet.export.sidecar import meta_path

        size = self.meta.image_size
        try:
            outs = self.runner(torch.full((1, 3, size, size), 114.0, device=self.device))
        except Exception as exc:  # the package's shape guards raise RuntimeError with a C++ message
            raise ExportError(f"{meta_path(self.path)}: does not match {self.path.name}: it does not run on a "
                              f"[1, 3, {size}, {size}] input ({_first_line(exc)})") from None
        shape_of = {}
        for stride, cls_name, reg_name in zip(self.strides, self.meta.cls_outputs, self.meta.reg_outputs):
            cells = (size // stride) ** 2
            shape_of[cls_name], shape_of[reg_name] = [1, cells, len(self.meta.classes)], [1, cells, 4]
        shapes = [list(o.shape) for o in outs]
        expected = [shape_of[n] for n in self.meta.outputs]
        if shapes != expected:
            raise ExportError(f"{meta_path(self.path)}: does not match {self.path.name}: the package gives outputs "
                              f"of shapes {shapes}, the sidecar describes {expected}")


def load_aoti_package(path: str | Path, device: str = "cpu") -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The package's model: a float32 [1, 3, S, S] tensor on `device` -> its output tensors;
    one-line ExportError for a file that is not a loadable AOTInductor package."""
    from rtmdet.export import ExportError

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ExportError(f"{path}: cannot read the AOTInductor package ({exc.strerror or exc})") from None
    if head != ZIP_MAGIC:
        what = "empty file, 0 bytes" if not head else f"not a zip archive; starts with {head!r}"
        raise ExportError(f"{path}: not an AOTInductor package ({what})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"{path}: an AOTInductor package compiled for cuda, and torch sees no CUDA GPU")
    # torch logs a warning and retries with its legacy loader when the first one fails; the one
    # line below says it all.
    quiet = logging.getLogger("torch._inductor.package.package")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    from torch._inductor import aoti_load_package

    try:
        return aoti_load_package(str(path))
    except Exception as exc:  # zipfile, RuntimeError from the C++ loader, dlopen errors: no common base
        raise ExportError(f"{path}: not a loadable AOTInductor package ({_first_line(exc)})") from None
    finally:
        quiet.setLevel(level)


def _first_line(exc: BaseException) -> str:
    from rtmdet.errors import first_line

    return first_line(exc, 120)
