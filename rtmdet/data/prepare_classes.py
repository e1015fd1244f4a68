"""The prepare stage for model.task classify: a checked class-folder dataset, listed once.

data.root may be a class-folder dataset (root/train/<class>/..., root/val/<class>/...) or a
detection dataset (Roboflow/COCO, e.g. the embedded synthetic shapes): its boxes are then cut
into a class-folder dataset under the prepared folder (`rtmdet crops`, padded 10%). Either way
the prepared folder holds classes.json, the images that passed the checks (paths relative to it)
with their labels, which the later stages read with `load_prepared_classes`; and stats.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rtmdet.data.class_folders import ClassificationDataset, ClassImage, ClassSplit, load_class_folders, summarize
from rtmdet.errors import DataError
from rtmdet.fileio import write_json_atomic

log = logging.getLogger(__name__)

INDEX = "classes.json"


def is_class_folders(root: Path) -> bool:
    """True when root/train holds class folders and no COCO annotation file (a Roboflow export's)."""
    train = Path(root) / "train"
    if not train.is_dir() or (train / "_annotations.coco.json").is_file():
        return False
    return any(d.is_dir() and not d.name.startswith(".") for d in train.iterdir())


def prepare_classes(data, out_dir: Path) -> dict[str, Any]:
    """Check data.root (or make crops of it) and write out_dir/classes.json; returns the statistics."""
    root = Path(data.root)
    out_dir = Path(out_dir)
    if data.split_files() is None and is_class_folders(root):
        dataset, source = load_class_folders(root), f"class folders {root}"
    else:
        from rtmdet.data.coco import load_dataset
        from rtmdet.data.crops import write_crops

        detection = load_dataset(root, splits=data.split_files())
        write_crops(detection, out_dir / "crops")
        dataset, source = load_class_folders(out_dir / "crops"), f"box crops of {root} (rtmdet crops, pad 0.1)"
        log.info("model.task classify on a detection dataset: its boxes cut into %s", out_dir / "crops")
    if data.num_classes is not None and data.num_classes != len(dataset.classes):
        raise DataError(f"data.num_classes is {data.num_classes} but {root} has {len(dataset.classes)} classes "
                        f"({', '.join(dataset.classes)})")
    if "val" not in dataset.splits:
        raise DataError(f"{dataset.root}: no val/ (or valid/) split; training and evaluation score on it")
    stats = summarize(dataset)
    stats["source"] = source
    write_json_atomic(out_dir / "stats.json", stats)
    splits = {}
    for name, split in dataset.splits.items():
        folder = Path(os.path.relpath(split.folder, out_dir.resolve()))
        splits[name] = {"folder": str(folder),
                        "images": [[os.path.relpath(im.file, split.folder), im.label] for im in split.images]}
    # classes.json last: its presence marks a complete prepared folder.
    write_json_atomic(out_dir / INDEX, {"task": "classify", "classes": dataset.classes, "source": source,
                                        "splits": splits})
    return stats


def load_prepared_classes(prepared_dir: Path) -> ClassificationDataset:
    """The class-folder dataset a classify prepare stage listed (images not re-opened)."""
    index_file = Path(prepared_dir) / INDEX
    if not index_file.is_file():
        raise DataError(f"{index_file}: prepared classification dataset not found; run the prepare stage with "
                        "model.task classify (dvc repro prepare)")
    index = json.loads(index_file.read_text())
    base = Path(prepared_dir).resolve()
    splits = {}
    for name, s in index["splits"].items():
        folder = (base / s["folder"]).resolve()
        splits[name] = ClassSplit(name, folder, [ClassImage(folder / f, int(label)) for f, label in s["images"]])
        missing = next((im.file for im in splits[name].images if not im.file.is_file()), None)
        if missing is not None:
            raise DataError(f"{missing}: listed by {index_file} but gone; run the prepare stage again")
    root = splits["train"].folder.parent if "train" in splits else base
    return ClassificationDataset(root, list(index["classes"]), splits)
