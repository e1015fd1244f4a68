"""RTMDet: the size table, the model, and `build_model`.

The size table is the only place that says what each size is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from rtmdet.errors import ConfigError
from rtmdet.inference.preprocess import NORMALIZATIONS
from rtmdet.models.backbone import CSPNeXt, scaled_blocks
from rtmdet.models.head import STRIDES, RTMDetSepBNHead
from rtmdet.models.layers import ACTIVATIONS


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; checkpoints store it under meta['rtmdet']."""

    size: str
    num_classes: int
    deepen: float
    widen: float
    channels: int  # neck output and head feature channels
    act: str
    channel_attention: bool
    normalization: str  # "imagenet" (mmdetection's BGR mean/std) or "unit" (x / 255)
    exp_on_reg: bool
    image_size: int  # the training/inference square size
    task: str = "detect"  # detect (boxes), segment (RTMDet-Ins) or rotate (RTMDet-R): picks the head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# nano is SSCMA's rtmdet_nano ncadc_relu6 in mmdetection's topology; the rest are mmdetection's.
SIZES: dict[str, ModelConfig] = {
    "nano": ModelConfig("nano", 80, 0.33, 0.25, 64, "relu6", False, "unit", False, 192),
    "tiny": ModelConfig("tiny", 80, 0.167, 0.375, 96, "silu", True, "imagenet", False, 640),
    "s": ModelConfig("s", 80, 0.33, 0.5, 128, "silu", True, "imagenet", False, 640),
    "m": ModelConfig("m", 80, 0.67, 0.75, 192, "silu", True, "imagenet", True, 640),
    "l": ModelConfig("l", 80, 1.0, 1.0, 256, "silu", True, "imagenet", True, 640),
    "x": ModelConfig("x", 80, 1.33, 1.25, 320, "silu", True, "imagenet", True, 640),
}


def _task_heads() -> dict[str, type[nn.Module]]:
    from rtmdet.models.head_ins import RTMDetInsSepBNHead
    from rtmdet.models.head_rotated import RotatedRTMDetSepBNHead

    return {"detect": RTMDetSepBNHead, "segment": RTMDetInsSepBNHead, "rotate": RotatedRTMDetSepBNHead}


TASKS = ("detect", "segment", "rotate")


class RTMDet(nn.Module):
    """CSPNeXt + CSPNeXtPAFPN + RTMDetSepBNHead. forward(normalized images) -> raw head maps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from rtmdet.models.neck import CSPNeXtPAFPN

        self.cfg = cfg
        self.backbone = CSPNeXt(cfg.deepen, cfg.widen, cfg.act, cfg.channel_attention)
        self.neck = CSPNeXtPAFPN(self.backbone.out_channels, cfg.channels, scaled_blocks(3, cfg.deepen), cfg.act)
        self.bbox_head = _task_heads()[cfg.task](cfg.num_classes, cfg.channels, 2, cfg.act, cfg.exp_on_reg)
        self.strides = STRIDES
        mean, std = NORMALIZATIONS[cfg.normalization]
        # Like mmdetection's data preprocessor: buffers that follow .to(device) but stay out of
        # the state dict, so checkpoints keep mmdetection's exact keys.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] BGR uint8 (or float 0..255) -> the normalized float input of forward."""
        return (images_uint8.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """Per level (strides 8, 16, 32): class logits [N, C, H/s, W/s], distances [N, 4, H/s, W/s]
        (task rotate: and angles [N, 1, H/s, W/s]; task segment: and kernels [N, 169, H/s, W/s],
        then the mask features [N, 8, H/8, W/8])."""
        return self.bbox_head(self.neck(self.backbone(images)))


def model_config(
    size: str,
    num_classes: int = 80,
    act: str | None = None,
    channel_attention: bool | None = None,
    normalization: str | None = None,
    image_size: int | None = None,
    task: str | None = None,
) -> ModelConfig:
    """The size's defaults with the given knobs changed; validates every value."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    if act is not None and act not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {act!r}; valid activations: {', '.join(sorted(ACTIVATIONS))}")
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if image_size is not None and (image_size % 32 or image_size < 32):
        raise ConfigError(f"image size must be a positive multiple of 32, got {image_size}")
    base = SIZES[size]
    changes = {"num_classes": num_classes, "act": act, "channel_attention": channel_attention,
               "normalization": normalization, "image_size": image_size, "task": task}
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def build_model(size: str, num_classes: int = 80, act: str | None = None, **knobs) -> RTMDet:
    """Build an RTMDet of a size (nano, tiny, s, m, l, x); act None keeps the size's default.

    Further knobs: channel_attention (bool), normalization ("imagenet" or "unit"), image_size, task
    ("detect"; "segment" for RTMDet-Ins's head; "rotate" for RTMDet-R's).
    """
    return RTMDet(model_config(size, num_classes, act, **knobs))

