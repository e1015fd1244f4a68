"""Inference backends: each turns a uint8 BGR batch into raw per-level head outputs.

A backend is small: `__call__(images_uint8 [N, 3, S, S]) -> (cls_scores, bbox_preds)` with, per
level, class logits [N, C, H, W] and distances in pixels [N, 4, H, W] as torch tensors (a segment
model's torch backend adds its kernels [N, 169, H, W] per level and the mask features [N, 8, S/8,
S/8]). Everything before (letterbox) and after (decode, NMS, masks) is shared in `Detector`, so
backends differ only here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from rtmdet.models.detector import RTMDet


class Backend(Protocol):
    """What a Detector needs from a runtime."""

    strides: tuple[int, ...]

    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...


class TorchBackend:
    """Runs an RTMDet module; normalization uses the model's own mean/std.

    fast: BatchNorm folded, channels_last and, on CUDA, `dtype` (fp32, fp16, bf16) weights and the
    forward replayed as a CUDA graph (rtmdet.inference.fast); "auto" = on for CUDA devices. half: the eager
    model under fp16 autocast on CUDA (ignored when fast).
    """

    def __init__(self, model: "RTMDet", device: str | torch.device = "cpu", half: bool = False,
                 fast: bool | str = False, dtype: str = "fp32"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.strides = tuple(model.strides)
        self.half = half and self.device.type == "cuda"
        if fast == "auto":
            fast = self.device.type == "cuda"
        self.fast = None
        if fast:
            from rtmdet.inference.fast import FastForward

            self.fast = FastForward(self.model, self.device, dtype)

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.fast is not None:
            return self.fast(images_uint8)
        x = self.model.normalize(images_uint8.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            outputs = self.model(x)
        return tuple(o.float() if isinstance(o, torch.Tensor) else [t.float() for t in o] for o in outputs)
