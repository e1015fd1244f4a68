"""The prepare stage's logic: validate a dataset once, write a normalized copy and its statistics.

Downstream stages read the normalized copy (`load_prepared`), so they see exactly the boxes
and images that survived validation, and the skipped items are counted in one report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from rtmdet.data.coco import load_dataset, summarize
from rtmdet.data.records import DetectionDataset, DetectionSplit
from rtmdet.errors import DataError
from rtmdet.fileio import write_json_atomic

log = logging.getLogger(__name__)

# COCO's area ranges, applied to boxes as the model sees them (after resizing to imgsz).
SMALL, MEDIUM = 32**2, 96**2
TINY_SIDE = 8  # boxes whose shorter side is under this many pixels at imgsz are hard to learn


def split_to_coco(split: DetectionSplit, dataset: DetectionDataset, masks: bool = False) -> dict[str, Any]:
    """The validated split as COCO JSON with the user's image and category ids; with `masks`, each
    instance's segmentation (the part that passed validation) too."""
    images, annotations = [], []
    ann_id = 1
    for rec in split.records:
        images.append({"id": rec.image_id, "file_name": os.path.relpath(rec.file, split.img_dir),
                       "width": rec.width, "height": rec.height})
        segms = rec.segmentations if masks and rec.segmentations is not None else [None] * len(rec.boxes)
        boxes = [(b, l, a, 0, m) for b, l, a, m in zip(rec.boxes, rec.labels, rec.areas, segms)]
        crowd = [(b, l, float((b[2] - b[0]) * (b[3] - b[1])), 1, None)
                 for b, l in zip(rec.crowd_boxes, rec.crowd_labels)]
        for box, label, area, iscrowd, segm in boxes + crowd:
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": ann_id, "image_id": rec.image_id, "category_id": dataset.category_ids[int(label)],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area), "iscrowd": iscrowd})
            if segm is not None:
                annotations[-1]["segmentation"] = segm
            ann_id += 1
    categories = [{"id": c, "name": n, "supercategory": "none"} for n, c in zip(dataset.classes, dataset.category_ids)]
    return {"images": images, "annotations": annotations, "categories": categories}


def box_size_stats(split: DetectionSplit, imgsz: int) -> dict[str, int]:
    """Boxes per COCO size bucket as the model sees them at imgsz, plus those under TINY_SIDE px."""
    counts = {"small": 0, "medium": 0, "large": 0, f"under_{TINY_SIDE}px": 0}
    for rec in split.records:
        if not len(rec.boxes):
            continue
        scale = imgsz / max(rec.width, rec.height)
        wh = (rec.boxes[:, 2:] - rec.boxes[:, :2]) * scale
        area = wh[:, 0] * wh[:, 1]
        counts["small"] += int((area < SMALL).sum())
        counts["medium"] += int(((area >= SMALL) & (area < MEDIUM)).sum())
        counts["large"] += int((area >= MEDIUM).sum())
        counts[f"under_{TINY_SIDE}px"] += int((wh.min(axis=1) < TINY_SIDE).sum())
    return counts


def stored_img_dir(img_dir: Path, out_dir: Path) -> str:
    """How dataset.json records an image folder: relative to the prepared folder when both are
    inside the working directory (the DVC project, which a clone or an experiment's temporary
    copy moves as a whole), else absolute. Both are resolved first, as load_dataset does."""
    img_dir, out_dir, project = Path(img_dir).resolve(), Path(out_dir).resolve(), Path.cwd().resolve()
    if img_dir.is_relative_to(project) and out_dir.is_relative_to(project):
        return os.path.relpath(img_dir, out_dir)
    return str(img_dir)


def prepare(dataset: DetectionDataset, out_dir: Path, imgsz: int, num_classes: int | None = None,
            masks: bool = False) -> dict[str, Any]:
    """Write out_dir/dataset.json + annotations/<split>.json and return the statistics dict; with
    `masks` (the segment task; the dataset read with its masks), the segmentations too."""
    if num_classes is not None and num_classes != len(dataset.classes):
        raise DataError(f"data.num_classes is {num_classes} but the dataset has {len(dataset.classes)} classes "
                        f"({', '.join(dataset.classes)})")
    splits = {}
    for name, split in dataset.splits.items():
        ann = out_dir / "annotations" / f"{name}.json"
        write_json_atomic(ann, split_to_coco(split, dataset, masks))
        splits[name] = {"ann_file": f"annotations/{name}.json", "img_dir": stored_img_dir(split.img_dir, out_dir),
                        "source_ann_file": str(split.ann_file)}
    stats = summarize(dataset)
    for name, split in dataset.splits.items():
        sizes = box_size_stats(split, imgsz)
        stats["splits"][name]["box_sizes_at_imgsz"] = sizes
        boxes = stats["splits"][name]["boxes"]
        if boxes and sizes[f"under_{TINY_SIDE}px"] > boxes / 2:
            msg = (f"split {name}: {sizes[f'under_{TINY_SIDE}px']} of {boxes} boxes are under {TINY_SIDE} px "
                   f"at imgsz {imgsz}; consider a larger model.imgsz")
            log.warning(msg)
            stats.setdefault("advice", []).append(msg)
    stats["imgsz"] = imgsz
    write_json_atomic(out_dir / "stats.json", stats)
    # dataset.json last: its presence marks a complete prepared folder.
    index = {"classes": dataset.classes, "category_ids": dataset.category_ids, "splits": splits}
    if masks:  # only then: a boxes-only prepared folder stays byte for byte what it was
        index["masks"] = True
    write_json_atomic(out_dir / "dataset.json", index)
    return stats


def load_prepared(prepared_dir: Path, check_images: bool = False, masks: bool = False) -> DetectionDataset:
    """The dataset a prepare stage wrote (validated already, so images are not re-opened by default);
    with `masks`, its instance masks (prepared for the segment task)."""
    index_file = Path(prepared_dir) / "dataset.json"
    if not index_file.is_file():
        raise DataError(f"{index_file}: prepared dataset not found; run the prepare stage first (dvc repro prepare)")
    index = json.loads(index_file.read_text())
    if masks and not index.get("masks"):
        raise DataError(f"{index_file}: prepared without instance masks; model.task segment needs them "
                        "(run the prepare stage again: dvc repro prepare)")
    prepared_dir = Path(prepared_dir).resolve()
    splits = {name: (prepared_dir / s["ann_file"], (prepared_dir / s["img_dir"]).resolve())
              for name, s in index["splits"].items()}
    dataset = load_dataset(splits=splits, check_images=check_images, masks=masks)
    if dataset.classes != index["classes"]:
        raise DataError(f"{index_file}: classes changed since prepare ({dataset.classes} vs {index['classes']})")
    return dataset


def plot_stats(stats: dict[str, Any], out_dir: Path) -> list[Path]:
    """Bar charts: boxes per class per split, and box sizes at imgsz per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(stats["splits"])
    classes = stats["classes"]
    written = []
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(classes) * len(names) + 2), 4.5), constrained_layout=True)
    width = 0.8 / len(names)
    x = np.arange(len(classes))
    for i, name in enumerate(names):
        counts = [stats["splits"][name]["per_class"].get(c, 0) for c in classes]
        bars = ax.bar(x + i * width - 0.4 + width / 2, counts, width, label=name)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, classes, rotation=30 if len(classes) > 4 else 0, ha="right" if len(classes) > 4 else "center")
    ax.set_ylabel("boxes")
    ax.set_title("Boxes per class")
    ax.legend()
    written.append(_save(fig, out_dir / "boxes_per_class.png"))
    buckets = ["small", "medium", "large"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for i, name in enumerate(names):
        counts = [stats["splits"][name]["box_sizes_at_imgsz"][b] for b in buckets]
        bars = ax.bar(np.arange(3) + i * width - 0.4 + width / 2, counts, width, label=name)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(np.arange(3), ["small\n(< 32²)", "medium\n(32²–96²)", "large\n(≥ 96²)"])
    ax.set_ylabel("boxes")
    ax.set_title(f"Box sizes at the training size ({stats['imgsz']} px)")
    ax.legend()
    written.append(_save(fig, out_dir / "box_sizes.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
