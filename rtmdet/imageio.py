"""Reading images the way the whole project does: OpenCV, BGR, uint8, EXIF applied."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from rtmdet.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an HxWx3 BGR uint8 array.

    Grayscale and RGBA files are converted to 3-channel BGR and the EXIF orientation
    is applied (cv2's IMREAD_COLOR does both). Reading the bytes with numpy first
    keeps non-ASCII file names working on every platform.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
    if data.size == 0:
        raise DataError(f"{path}: image file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    return image


def list_images(folder: str | Path) -> list[Path]:
    """All image files under a folder (recursive), sorted by path."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
