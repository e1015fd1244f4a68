"""CSPNeXt image classifiers: mmpretrain's ImageClassifier (CSPNeXt, global average pooling,
LinearClsHead) with its state-dict keys, so mmpretrain's CSPNeXt checkpoints load strictly and
a trained classifier's `backbone.*` starts a detector (rtmdet.models.checkpoint._load_backbone).

The backbone is the detector's own CSPNeXt module: same sizes, same keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

import torch
from torch import nn

from rtmdet.errors import ConfigError
from rtmdet.models.backbone import CSPNeXt
from rtmdet.models.detector import SIZES
from rtmdet.models.layers import ACTIVATIONS

# mmpretrain's ClsDataPreprocessor for these configs: to_rgb, then ImageNet mean/std in RGB order.
RGB_MEAN = (123.675, 116.28, 103.53)
RGB_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild a classifier (the detector table's backbone of a size)."""

    task: ClassVar[str] = "classify"  # the task table's entry (rtmdet.training.tasks), not a stored field
    size: str
    num_classes: int
    deepen: float
    widen: float
    act: str
    channel_attention: bool
    image_size: int = 224  # mmpretrain's crop size for these configs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class LinearClsHead(nn.Module):
    """mmpretrain's LinearClsHead: one fully connected layer on the pooled feature (key `fc`)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class CSPNeXtClassifier(nn.Module):
    """CSPNeXt (its last stage's output) -> global average pooling -> linear logits."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = CSPNeXt(cfg.deepen, cfg.widen, cfg.act, cfg.channel_attention)
        self.head = LinearClsHead(self.backbone.out_channels[-1], cfg.num_classes)
        # Out of the state dict (persistent=False), like the detector's: mmpretrain's exact keys.
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(RGB_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images_bgr: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] BGR uint8 (or float 0..255), as the loaders decode -> the model's RGB input."""
        return (images_bgr.flip(1).float() - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images -> the pooled last-stage feature [N, C] (mmpretrain's neck output)."""
        return self.backbone(images)[-1].mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images -> class logits [N, num_classes] (before softmax)."""
        return self.head(self.features(images))


def classifier_config(size: str, num_classes: int = 1000, act: str | None = None,
                      channel_attention: bool | None = None, image_size: int | None = None) -> ClassifierConfig:
    """A size's backbone (nano, tiny, s, m, l, x) with a head of num_classes; validates every value."""
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    if act is not None and act not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {act!r}; valid activations: {', '.join(sorted(ACTIVATIONS))}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes!r}")
    if image_size is not None and (image_size % 32 or image_size < 32):
        raise ConfigError(f"image size must be a positive multiple of 32, got {image_size}")
    base = SIZES[size]
    cfg = ClassifierConfig(size, num_classes, base.deepen, base.widen, base.act, base.channel_attention)
    changes = {"act": act, "channel_attention": channel_attention, "image_size": image_size}
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})


def build_classifier(size: str, num_classes: int = 1000, act: str | None = None, **knobs) -> CSPNeXtClassifier:
    """Build a CSPNeXt classifier of a size; act None keeps the size's default (nano relu6, else
    silu). Further knobs: channel_attention (bool), image_size."""
    return CSPNeXtClassifier(classifier_config(size, num_classes, act, **knobs))
