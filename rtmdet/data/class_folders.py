"""Classification datasets in the class-folder layout users export: root/<split>/<class>/<image>.

    root/train/cat/001.jpg, root/train/dog/002.png, root/val/cat/..., optional root/test/...

`val` may also be named `valid` or `validation` (Roboflow's classification exports say
`valid`). Classes are train's class folders, sorted by name (torchvision's ImageFolder order).
What cannot be used is one clear error; what can be skipped is counted, logged and kept in
`warnings` (reason -> count).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from rtmdet.errors import DataError
from rtmdet.imageio import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
REASONS = {
    "empty_class": "class folders in train without images (the class is left out)",
    "loose_images": "images directly under the split folder, not in a class folder (skipped)",
    "unreadable_image": "image files that do not decode (skipped)",
}


@dataclass(frozen=True)
class ClassImage:
    """One image and its class index."""

    file: Path
    label: int


@dataclass
class ClassSplit:
    """A split's images and what was skipped, counted per reason."""

    name: str
    folder: Path
    images: list[ClassImage]
    warnings: Counter = field(default_factory=Counter)

    def per_class(self, classes: list[str]) -> dict[str, int]:
        counts = Counter(im.label for im in self.images)
        return {name: counts.get(i, 0) for i, name in enumerate(classes)}


@dataclass
class ClassificationDataset:
    """All splits with one class list (classes[label] is the folder name)."""

    root: Path
    classes: list[str]
    splits: dict[str, ClassSplit]


def load_class_folders(root: str | Path, check_images: bool = True) -> ClassificationDataset:
    """Read and check a class-folder dataset; DataError when it cannot be used. With
    check_images every image is decoded (at reduced size: fast) and unreadable ones skipped."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    folders = {split: _split_folder(root, split) for split in SPLIT_FOLDERS}
    if folders["train"] is None:
        raise DataError(f"{root}: no train/ folder (expected train/<class>/<image>.jpg)")
    train_classes = _class_folders(folders["train"])
    if not train_classes:
        raise DataError(f"{folders['train']}: no class folders (expected train/<class>/<image>.jpg)")
    listed = {d.name: _images(d) for d in train_classes}
    classes = [name for name, files in listed.items() if files]
    empty = [name for name, files in listed.items() if not files]
    if len(classes) < 2:
        raise DataError(f"{folders['train']}: {len(classes)} class folder(s) with images; a classifier needs 2 or more")
    splits = {}
    for split, folder in folders.items():
        if folder is None:
            continue
        splits[split] = _read_split(split, folder, classes, check_images)
    if empty:
        splits["train"].warnings["empty_class"] = len(empty)
        log.warning("%s: %d class folder(s) without images left out: %s", folders["train"], len(empty),
                    ", ".join(empty[:5]))
    return ClassificationDataset(root, classes, splits)


def _split_folder(root: Path, split: str) -> Path | None:
    found = [root / name for name in SPLIT_FOLDERS[split] if (root / name).is_dir()]
    if len(found) > 1:
        raise DataError(f"{root}: both {found[0].name}/ and {found[1].name}/ exist; keep one {split} split")
    return found[0] if found else None


def _class_folders(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _read_split(split: str, folder: Path, classes: list[str], check_images: bool) -> ClassSplit:
    label_of = {name: i for i, name in enumerate(classes)}
    result = ClassSplit(split, folder, [])
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        result.warnings["loose_images"] = len(loose)
        log.warning("%s: %d image(s) directly under the split folder, not in a class folder, skipped (e.g. %s)",
                    folder, len(loose), loose[0].name)
    for class_dir in _class_folders(folder):
        files = _images(class_dir)
        if class_dir.name not in label_of:
            if files:
                raise DataError(f"{class_dir}: class {class_dir.name!r} has {len(files)} image(s) in {folder.name}/ "
                                f"but no images in train/; add it to train/ or remove the folder")
            continue
        result.images += [ClassImage(f, label_of[class_dir.name]) for f in files]
    if check_images:
        good = [_decodes(im.file) for im in result.images]
        bad = [im for im, ok in zip(result.images, good) if not ok]
        if bad:
            result.images = [im for im, ok in zip(result.images, good) if ok]
            result.warnings["unreadable_image"] = len(bad)
            log.warning("%s: %d unreadable image(s) skipped (e.g. %s)", folder, len(bad), bad[0].file)
    if not result.images:
        raise DataError(f"{folder}: the {split} split has no usable images")
    return result


def _decodes(path: Path) -> bool:
    """True when the file decodes as an image (at 1/8 size: checks the data, costs little)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return False
    return data.size > 0 and cv2.imdecode(data, cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None


def summarize(dataset: ClassificationDataset) -> dict:
    """Images per split and class, and the counted warnings (JSON-ready)."""
    return {"root": str(dataset.root), "classes": dataset.classes,
            "splits": {name: {"images": len(s.images), "per_class": s.per_class(dataset.classes),
                              "warnings": dict(s.warnings)} for name, s in dataset.splits.items()}}
