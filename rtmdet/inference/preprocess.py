"""The one pre-process: mmdetection's test pipeline (keep-ratio resize, pad with 114, normalize).

Training's validation pipeline, evaluation, export calibration and every inference backend
call these functions, so a model always sees the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

PAD_VALUE = 114

# mmdetection's DetDataPreprocessor statistics, in BGR order (bgr_to_rgb=False).
IMAGENET_MEAN_BGR = (103.53, 116.28, 123.675)
IMAGENET_STD_BGR = (57.375, 57.12, 58.395)
# SSCMA's nano: x / 255.
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (255.0, 255.0, 255.0)

NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN_BGR, IMAGENET_STD_BGR), "unit": (UNIT_MEAN, UNIT_STD)}


@dataclass(frozen=True)
class LetterboxInfo:
    """How an original image maps onto the model canvas (padding is bottom/right)."""

    ori_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    scale_wh: tuple[float, float]


def rescale_size(w: int, h: int, target: int) -> tuple[int, int, float]:
    """mmcv's keep-ratio rescale: the largest scale that fits w x h inside target x target."""
    scale = min(target / max(w, h), target / min(w, h))
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    return new_w, new_h, scale


def letterbox(image: np.ndarray, size: int, pad_value: int = PAD_VALUE) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping aspect ratio (cv2 bilinear) and pad bottom/right to size x size."""
    h, w = image.shape[:2]
    new_w, new_h, _ = rescale_size(w, h, size)
    if (new_w, new_h) != (w, h):
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    else:
        resized = image
    canvas = np.full((size, size, 3), pad_value, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    info = LetterboxInfo(ori_hw=(h, w), resized_hw=(new_h, new_w), scale_wh=(new_w / w, new_h / h))
    return canvas, info


def normalize(batch_bgr_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[N, 3, H, W] uint8 BGR -> float32 (x - mean) / std, per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=batch_bgr_uint8.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch_bgr_uint8.device).view(1, 3, 1, 1)
    return (batch_bgr_uint8.float() - m) / s


def to_chw_tensor(canvases: list[np.ndarray]) -> torch.Tensor:
    """Stack HxWx3 uint8 canvases into an [N, 3, H, W] uint8 tensor."""
    return torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2).contiguous()
