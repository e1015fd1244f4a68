"""Rotated-box datasets in DOTA's layout: root/<split>/images/* and root/<split>/labelTxt/*.txt.

A label file has optional `imagesource:` and `gsd:` header lines, then one object per line:

    x1 y1 x2 y2 x3 y3 x4 y4 category difficult

(mmrotate's split folders name the labels `annfiles/`; both names are read.) Each quad becomes
its minimum-area rectangle (cx, cy, w, h, angle in le90, rtmdet.geometry.rotated). Classes are
the categories of the train split, sorted, unless given. What cannot be used is one error naming
the file and line; what can be skipped or changed is counted per reason in `warnings`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rtmdet.errors import DataError
from rtmdet.geometry.rotated import quad_to_rbox
from rtmdet.imageio import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "valid", "test")  # DOTA names the validation split val, Roboflow valid
LABEL_FOLDERS = ("labelTxt", "annfiles")
REASONS = {
    "background_image": "images without objects (an empty or missing label file): kept as background",
    "label_without_image": "label files whose image is missing (skipped)",
    "non_rectangular": "quads that were not rectangles, fitted with their minimum-area rectangle",
    "partly_outside": "boxes with corners more than 1 px outside the image (kept; they overlap it)",
    "outside": "boxes wholly outside the image (skipped)",
    "degenerate": "quads with no area (skipped)",
}


@dataclass
class RotatedRecord:
    """One image and its rotated boxes: rboxes [K, 5] (cx, cy, w, h, angle), labels [K] int64,
    difficult [K] bool (DOTA's flag; evaluation ignores those)."""

    image_id: int
    file: Path
    width: int
    height: int
    rboxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass
class RotatedSplit:
    name: str
    folder: Path
    records: list[RotatedRecord]
    warnings: Counter = field(default_factory=Counter)


@dataclass
class RotatedDataset:
    classes: list[str]
    splits: dict[str, RotatedSplit]

    def validation(self) -> RotatedSplit | None:
        """The validation split (folder val/ or valid/), None when there is none."""
        return self.splits.get("valid") or self.splits.get("val")


def load_dota(root: str | Path, classes: list[str] | None = None) -> RotatedDataset:
    """Read and check a DOTA-layout dataset; DataError when it cannot be used."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder (expected train/images/ and train/labelTxt/)")
    if (root / "val").is_dir() and (root / "valid").is_dir():
        raise DataError(f"{root}: has both val/ and valid/; keep one validation split")
    parsed = {split: _parse_split(root / split) for split in SPLITS if (root / split).is_dir()}
    if classes is None:
        classes = sorted({obj[1] for objects, _ in parsed["train"][0].values() for obj in objects})
        if not classes:
            raise DataError(f"{root / 'train'}: no objects in any label file")
    label_of = {name: i for i, name in enumerate(classes)}
    splits = {}
    for split, (per_image, warnings) in parsed.items():
        records = []
        for image_id, (path, (objects, size)) in enumerate(sorted(per_image.items())):
            records.append(_record(image_id, path, objects, size, label_of, warnings))
        if not records:
            raise DataError(f"{root / split}: the {split} split has no images")
        splits[split] = RotatedSplit(split, root / split, records, warnings)
        for reason, count in warnings.items():
            log.warning("%s: %d %s", root / split, count, REASONS[reason])
    return RotatedDataset(list(classes), splits)


def _parse_split(folder: Path) -> tuple[dict[Path, tuple[list, tuple[int, int]]], Counter]:
    """image path -> (objects [(quad [4, 2], category, difficult, "file:line")], (width, height))."""
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise DataError(f"{folder}: no images/ folder")
    labels_dir = next((folder / name for name in LABEL_FOLDERS if (folder / name).is_dir()), None)
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    warnings: Counter = Counter()
    labels = {} if labels_dir is None else {p.stem: p for p in sorted(labels_dir.glob("*.txt"))}
    orphans = [stem for stem in labels if stem not in images]
    if orphans:
        warnings["label_without_image"] = len(orphans)
    out = {}
    for stem, image in images.items():
        objects = _read_labels(labels[stem]) if stem in labels else []
        out[image] = (objects, _image_size(image))
    return out, warnings


def _read_labels(path: Path) -> list[tuple[np.ndarray, str, bool, str]]:
    """(quad [4, 2], category, difficult, "file:line") per object line."""
    objects = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label file ({exc})") from None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith(("imagesource:", "gsd:")):
            continue
        parts = line.split()
        if len(parts) not in (9, 10):
            raise DataError(f"{path}:{number}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]', "
                            f"got {len(parts)} fields")
        try:
            quad = np.array([float(v) for v in parts[:8]], np.float64).reshape(4, 2)
            difficult = len(parts) == 10 and int(parts[9]) != 0
        except ValueError:
            raise DataError(f"{path}:{number}: the 8 corner coordinates and the difficult flag must be numbers") \
                from None
        if not np.isfinite(quad).all():
            raise DataError(f"{path}:{number}: a corner coordinate is not finite")
        objects.append((quad, parts[8], difficult, f"{path}:{number}"))
    return objects


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def _record(image_id: int, path: Path, objects: list, size: tuple[int, int], label_of: dict[str, int],
            warnings: Counter) -> RotatedRecord:
    w, h = size
    if not objects:
        warnings["background_image"] += 1
        return RotatedRecord(image_id, path, w, h, np.zeros((0, 5), np.float32), np.zeros(0, np.int64),
                             np.zeros(0, bool))
    for _, name, _, where in objects:
        if name not in label_of:
            raise DataError(f"{where}: unknown category {name!r} (classes: {', '.join(label_of)})")
    quads = np.stack([o[0] for o in objects])
    rboxes, is_rect = quad_to_rbox(quads)
    area = rboxes[:, 2] * rboxes[:, 3]
    lo, hi = quads.min(1), quads.max(1)
    outside = (hi[:, 0] <= 0) | (hi[:, 1] <= 0) | (lo[:, 0] >= w) | (lo[:, 1] >= h)
    partly = ~outside & ((lo < -1).any(1) | (hi[:, 0] > w + 1) | (hi[:, 1] > h + 1))
    degenerate = area <= 1e-6
    keep = ~outside & ~degenerate
    counts = {"non_rectangular": ~is_rect & keep, "partly_outside": partly & keep, "outside": outside,
              "degenerate": degenerate & ~outside}
    warnings.update({reason: int(mask.sum()) for reason, mask in counts.items() if mask.any()})
    labels = np.array([label_of[o[1]] for o in objects], np.int64)
    difficult = np.array([o[2] for o in objects], bool)
    return RotatedRecord(image_id, path, w, h, rboxes[keep], labels[keep], difficult[keep])


def summarize(dataset: RotatedDataset) -> dict:
    """Images, boxes per class and the counted warnings per split (JSON-ready)."""
    splits = {}
    for name, split in dataset.splits.items():
        labels = np.concatenate([r.labels for r in split.records]) if split.records else np.zeros(0, np.int64)
        counts = np.bincount(labels, minlength=len(dataset.classes))
        splits[name] = {"images": len(split.records), "boxes": int(counts.sum()),
                        "difficult": int(sum(r.difficult.sum() for r in split.records)),
                        "per_class": {c: int(n) for c, n in zip(dataset.classes, counts)},
                        "warnings": {k: int(v) for k, v in split.warnings.items() if v}}
    return {"classes": list(dataset.classes), "splits": splits}


PREPARED = "rotated.json"  # the prepare stage's listing of a DOTA-layout dataset


def write_prepared(dataset: RotatedDataset, out_dir: Path) -> Path:
    """The checked dataset as one JSON listing (classes; per split each image's absolute path, size,
    boxes, labels, difficult flags and the split's counted warnings): what the later stages read."""
    from rtmdet.fileio import write_json_atomic

    splits = {name: {"folder": str(split.folder), "warnings": dict(split.warnings),
                     "records": [{"id": r.image_id, "file": str(r.file), "width": r.width, "height": r.height,
                                  "rboxes": np.asarray(r.rboxes, np.float64).round(4).tolist(),
                                  "labels": r.labels.tolist(), "difficult": r.difficult.tolist()}
                                 for r in split.records]}
              for name, split in dataset.splits.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PREPARED
    write_json_atomic(path, {"format": "dota", "classes": list(dataset.classes), "splits": splits})
    return path


def read_prepared(prepared_dir: Path) -> RotatedDataset:
    """write_prepared's dataset back; one clear error when the listing is missing or not a rotated one."""
    import json

    path = Path(prepared_dir) / PREPARED
    if not path.is_file():
        raise DataError(f"{path}: not found; the prepare stage of model.task rotate writes it (dvc repro prepare)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: broken JSON at line {exc.lineno}: {exc.msg}") from None
    splits = {}
    for name, split in doc["splits"].items():
        records = [RotatedRecord(r["id"], Path(r["file"]), r["width"], r["height"],
                                 np.asarray(r["rboxes"], np.float32).reshape(-1, 5), np.asarray(r["labels"], np.int64),
                                 np.asarray(r["difficult"], bool)) for r in split["records"]]
        splits[name] = RotatedSplit(name, Path(split["folder"]), records, Counter(split["warnings"]))
    return RotatedDataset(doc["classes"], splits)
