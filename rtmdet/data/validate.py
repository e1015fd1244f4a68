"""Validation of one COCO annotation file, of its image files and of its boxes.

Structural problems (bad JSON, missing keys, dangling or duplicate ids, malformed boxes) are
errors: a `DataError` with one line naming the file, the entry and the problem. Problems that
only cost a few items (a degenerate box, a corrupt image among thousands) are skipped and
counted per reason by the caller (`rtmdet.data.coco`), never dropped silently.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from rtmdet.data.masks import REASONS as MASK_REASONS
from rtmdet.errors import DataError

# Reason -> what the count means; the keys are the stable names in split.warnings and reports.
REASONS: dict[str, str] = {
    "degenerate_box": "boxes with zero or negative width/height skipped",
    "box_outside_image": "boxes entirely outside their image skipped",
    "box_clipped": "boxes partly outside their image clipped to it (kept)",
    "missing_image": "images listed in the JSON but missing on disk skipped",
    "corrupt_image": "unreadable or truncated image files skipped",
    "unsupported_image": "image files in a format OpenCV cannot decode skipped",
    "exif_rotated": "images annotated before their EXIF rotation (boxes rotated to match)",
    "size_mismatch": "images whose JSON width/height differ from the pixels (pixel size used)",
    # Instance masks (read only for the segment task, rtmdet.data.masks):
    **MASK_REASONS,
    "rle_on_rotated_image": "RLE masks of images annotated before their EXIF rotation (instance dropped)",
}

# PIL format names of the files that cv2.imdecode (rtmdet.imageio.read_image) can decode.
DECODABLE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "DIB", "WEBP", "TIFF", "PPM"}
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # the ones that swap width and height


@dataclass(slots=True)
class RawAnnotation:
    """One annotation as written in the JSON, after type checks."""

    ann_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, width, height
    area: float | None
    crowd: bool
    segmentation: Any = None  # as written (polygons or RLE); read only when masks are asked for


@dataclass(slots=True)
class RawImage:
    """One image entry as written in the JSON, with its annotations."""

    image_id: int
    file_name: str
    width: int | None  # None when the JSON does not say
    height: int | None
    annotations: list[RawAnnotation] = field(default_factory=list)


@dataclass
class CocoFile:
    """A structurally valid COCO annotation file."""

    path: Path
    categories: dict[int, str]  # id -> name, in file order
    images: list[RawImage]


# ----------------------------------------------------------------------------- JSON structure


def read_coco_file(path: Path, *, need_sizes: bool = True) -> CocoFile:
    """Read and structurally validate a COCO annotation file (raises DataError).

    need_sizes: image entries must carry width/height (when images are not opened, they are
    the only source of the image size).
    """
    data = _load_json(path)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f'{path}: missing top-level key "{key}" (a COCO file needs images, '
                            "annotations and categories)")
        if not isinstance(data[key], list):
            raise DataError(f'{path}: top-level "{key}" must be a list, found {_type_name(data[key])}')
    categories = _parse_categories(path, data["categories"])
    images = _parse_images(path, data["images"], need_sizes)
    _parse_annotations(path, data["annotations"], images, categories)
    return CocoFile(path, categories, list(images.values()))


def _load_json(path: Path) -> dict:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path}: annotation file {what}")
    try:
        # utf-8-sig: exports saved on Windows sometimes start with a byte-order mark.
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file, cannot be COCO JSON") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation file ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories, "
                        f"found {_type_name(data)}")
    return data


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(kind: str, plural: str, index: int, entry: dict) -> str:
    """How messages name an entry: by its id when it has a usable one, else by position."""
    return f"{kind} id {entry['id']}" if _is_int(entry.get("id")) else f"{plural}[{index}]"


def _fields(path: Path, plural: str, kind: str, index: int, entry: Any, keys: tuple[str, ...]) -> str:
    """Check that an entry is an object with the given keys; return its name for messages."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {plural}[{index}] must be an object, found {_type_name(entry)}")
    name = _entry(kind, plural, index, entry)
    for key in keys:
        if key not in entry:
            raise DataError(f'{path}: {name} has no "{key}" key')
    if not _is_int(entry["id"]):
        raise DataError(f'{path}: {plural}[{index}] has "id" {_short(entry["id"])}; expected an integer')
    return name


def _parse_categories(path: Path, entries: list) -> dict[int, str]:
    categories: dict[int, str] = {}
    first_index: dict[int, int] = {}
    for index, entry in enumerate(entries):
        name = _fields(path, "categories", "category", index, entry, ("id", "name"))
        cat_id, cat_name = entry["id"], entry["name"]
        if cat_id in categories:
            raise DataError(f"{path}: duplicate category id {cat_id} "
                            f"(categories[{first_index[cat_id]}] and categories[{index}])")
        if not isinstance(cat_name, str) or not cat_name.strip():
            raise DataError(f'{path}: {name} has "name" {_short(cat_name)}; expected a non-empty string')
        categories[cat_id] = cat_name
        first_index[cat_id] = index
    return categories


def _parse_images(path: Path, entries: list, need_sizes: bool) -> dict[int, RawImage]:
    images: dict[int, RawImage] = {}
    first_index: dict[int, int] = {}
    for index, entry in enumerate(entries):
        keys = ("id", "file_name", "width", "height") if need_sizes else ("id", "file_name")
        name = _fields(path, "images", "image", index, entry, keys)
        image_id = entry["id"]
        if image_id in images:
            raise DataError(f"{path}: duplicate image id {image_id} "
                            f"(images[{first_index[image_id]}] and images[{index}])")
        file_name = entry["file_name"]
        if not isinstance(file_name, str) or not file_name.strip():
            raise DataError(f'{path}: {name} has "file_name" {_short(file_name)}; expected a file name')
        size = []
        for key in ("width", "height"):
            value = entry.get(key)
            # Some exporters write sizes as floats (640.0); a fraction or a non-positive size is wrong.
            if value is not None and not (_is_number(value) and value > 0 and float(value).is_integer()):
                raise DataError(f'{path}: {name} has "{key}" {_short(value)}; expected a positive integer')
            size.append(None if value is None else int(value))
        images[image_id] = RawImage(image_id, file_name, size[0], size[1])
        first_index[image_id] = index
    return images


def _parse_annotations(path: Path, entries: list, images: dict[int, RawImage],
                       categories: dict[int, str]) -> None:
    seen: dict[int, int] = {}
    for index, entry in enumerate(entries):
        name = _fields(path, "annotations", "annotation", index, entry,
                       ("id", "image_id", "category_id", "bbox"))
        ann_id = entry["id"]
        if ann_id in seen:
            raise DataError(f"{path}: duplicate annotation id {ann_id} "
                            f"(annotations[{seen[ann_id]}] and annotations[{index}])")
        seen[ann_id] = index
        image = images.get(entry["image_id"]) if _is_int(entry["image_id"]) else None
        if image is None:
            raise DataError(f"{path}: {name} points at unknown image id {_short(entry['image_id'])}")
        category_id = entry["category_id"]
        if not _is_int(category_id) or category_id not in categories:
            raise DataError(f"{path}: {name} points at unknown category id {_short(category_id)}")
        bbox = entry["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DataError(f"{path}: {name} has bbox {_short(bbox)}; expected a list of 4 numbers "
                            "[x, y, width, height]")
        crowd = entry.get("iscrowd", 0)
        if crowd not in (0, 1):  # True/False compare equal to 1/0, which is fine
            raise DataError(f'{path}: {name} has "iscrowd" {_short(crowd)}; expected 0 or 1')
        area = entry.get("area")
        # A missing, null or non-positive area is common in hand-made files; the box area replaces it.
        area = float(area) if _is_number(area) and area > 0 else None
        image.annotations.append(RawAnnotation(ann_id, category_id, tuple(float(v) for v in bbox), area,
                                               bool(crowd), entry.get("segmentation")))


# ----------------------------------------------------------------------------- image files


@dataclass(frozen=True, slots=True)
class ImageProbe:
    """What opening an image file told us; width/height are after EXIF orientation."""

    status: str  # "ok", "missing_image", "corrupt_image" or "unsupported_image"
    width: int = 0
    height: int = 0
    orientation: int = 1
    detail: str = ""


def probe_image(path: Path) -> ImageProbe:
    """Open an image with PIL: size, EXIF orientation, and a decode that catches truncation.

    JPEGs are decoded in draft mode (DCT scaling, up to 8x smaller), which still reads every
    byte of the entropy-coded data, so a truncated file fails at a fraction of a full decode.
    PIL is stricter than OpenCV here: a truncated JPEG that cv2 would half-decode is corrupt.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            fmt = image.format or "unknown"
            if fmt not in DECODABLE_FORMATS:
                return ImageProbe("unsupported_image", detail=f"{fmt} format")
            orientation = _orientation(image)
            if fmt in ("JPEG", "MPO"):
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except FileNotFoundError:
        return ImageProbe("missing_image", detail="file not found")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError is an OSError; truncation is "image file is truncated".
        detail = "not an image" if isinstance(exc, UnidentifiedImageError) else str(exc) or type(exc).__name__
        return ImageProbe("corrupt_image", detail=detail)
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageProbe("ok", width, height, orientation)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a good image unusable
        return 1
    return value if _is_int(value) and 1 <= value <= 8 else 1


def probe_images(paths: list[Path], workers: int | None = None,
                 desc: str = "checking images") -> list[ImageProbe]:
    """Probe many images in parallel threads (PIL releases the GIL while decoding)."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    # disable=None: a progress bar on a terminal only, never in logs or captured output.
    progress = dict(total=len(paths), desc=desc, unit="img", leave=False, disable=None)
    if workers <= 1 or len(paths) < 16:
        return list(tqdm((probe_image(p) for p in paths), **progress))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(probe_image, paths, chunksize=16), **progress))


# ----------------------------------------------------------------------------- boxes


def raw_to_oriented(xyxy: np.ndarray, orientation: int, raw_w: int, raw_h: int) -> np.ndarray:
    """Map xyxy boxes drawn on the stored (pre-EXIF) pixels onto the EXIF-oriented image.

    The point maps follow PIL's ImageOps.exif_transpose (and OpenCV's decoder) per
    orientation tag; the box is the min/max of its two mapped corners.
    """
    x = xyxy[:, [0, 2]]
    y = xyxy[:, [1, 3]]
    maps = {
        1: (x, y),
        2: (raw_w - x, y),
        3: (raw_w - x, raw_h - y),
        4: (x, raw_h - y),
        5: (y, x),
        6: (raw_h - y, x),
        7: (raw_h - y, raw_w - x),
        8: (y, raw_w - x),
    }
    nx, ny = maps[orientation]
    return np.stack([nx.min(1), ny.min(1), nx.max(1), ny.max(1)], axis=1).astype(np.float32)


def raw_points_to_oriented(xy: np.ndarray, orientation: int, raw_w: int, raw_h: int) -> np.ndarray:
    """raw_to_oriented for points [N, 2] (polygon vertices)."""
    boxes = np.concatenate([xy, xy], axis=1)  # a point is a box with two equal corners
    return raw_to_oriented(boxes, orientation, raw_w, raw_h)[:, :2]


def clean_boxes(xyxy: np.ndarray, width: int,
                height: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Drop degenerate and outside boxes and clip partly-outside ones to the image.

    Returns (kept_index, clipped_xyxy_of_kept, reason -> boolean mask over the input boxes),
    so the caller can count and name what changed. A box touching the border is not clipped.
    """
    x1, y1, x2, y2 = xyxy.reshape(-1, 4).T
    degenerate = (x2 <= x1) | (y2 <= y1)
    outside = ~degenerate & ((x1 >= width) | (y1 >= height) | (x2 <= 0) | (y2 <= 0))
    keep = ~degenerate & ~outside
    clipped = keep & ((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height))
    kept = xyxy.reshape(-1, 4)[keep].astype(np.float32)
    np.clip(kept[:, 0::2], 0, width, out=kept[:, 0::2])
    np.clip(kept[:, 1::2], 0, height, out=kept[:, 1::2])
    reasons = {"degenerate_box": degenerate, "box_outside_image": outside, "box_clipped": clipped}
    return np.flatnonzero(keep), kept, reasons
