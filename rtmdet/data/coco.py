"""Read COCO / Roboflow detection datasets into validated records.

Layouts:
  * Roboflow: ROOT/{train,valid,test}/_annotations.coco.json with the images beside each file
    (`val/` and `validation/` are read as the "valid" split); train and valid are required.
  * COCO: ROOT/annotations/instances_{train,val}*.json with images in ROOT/{train,val}*/.
  * Explicit: `splits={"train": (ann_file, img_dir), ...}` (mmdetection's ann_file/img_prefix).

Classes are the categories that have at least one box (crowd or not) in any split, as
contiguous labels in category-id order. Which categories count as used is decided from the
JSON alone, so the class list never depends on which image files happen to be readable.

Paths: a split's annotation file and image folder are recorded resolved (symbolic links
followed, `Path.resolve()`), and image paths are that folder joined with the JSON's file name.
One dataset reached through a linked folder and through its real path gives the same records,
the same duplicate-file checks and the same prepared copy.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from rtmdet.data.masks import check_segmentation
from rtmdet.data.records import DetectionDataset, DetectionSplit, ImageRecord
from rtmdet.data.validate import (
    REASONS, TRANSPOSING_ORIENTATIONS, CocoFile, ImageProbe, RawImage, clean_boxes, probe_images,
    raw_points_to_oriented, raw_to_oriented, read_coco_file,
)
from rtmdet.errors import DataError

logger = logging.getLogger(__name__)

ROBOFLOW_ANN = "_annotations.coco.json"
SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}
REQUIRED_SPLITS = ("train", "valid")

PathLike = str | Path


def load_dataset(root: PathLike | None = None, *,
                 splits: dict[str, tuple[PathLike, PathLike]] | None = None,
                 check_images: bool = True, masks: bool = False) -> DetectionDataset:
    """Read and validate a dataset; raise DataError when it cannot be used.

    masks: also read each box's `segmentation` (the segment task): instances without a usable
    one are dropped and counted, a segmentation of the wrong kind is an error.

    Give `root` (Roboflow or COCO layout) or `splits` (name -> (ann_file, img_dir), relative to
    root when root is given). With check_images every image is opened (size, EXIF orientation,
    a decode that catches truncation); without it only the JSON is checked and its sizes trusted.

    Image size rule: boxes are in the pixels as decoded with EXIF applied. When the JSON's
    width/height equal the stored (pre-EXIF) size of an image whose EXIF tag rotates it by 90°,
    the boxes were drawn on the stored pixels: they are rotated to match (`exif_rotated`). Any
    other mismatch keeps the boxes as written and uses the real size (`size_mismatch`), so
    boxes then beyond the image are clipped or skipped and counted. Flips and 180° tags cannot
    be told apart from the JSON; like mmdetection, boxes are then taken as drawn on the
    oriented image. A few missing or corrupt image files are skipped and counted; more than
    half of a split missing means a wrong image folder and is an error.
    """
    layout = _resolve_splits(root, splits)
    files = {name: read_coco_file(ann, need_sizes=not check_images) for name, (ann, _) in layout.items()}
    classes, category_ids, notes = build_classes(files)
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids)}
    result = {name: _build_split(name, files[name], img_dir, label_of, check_images, masks)
              for name, (_, img_dir) in layout.items()}
    return DetectionDataset(classes, category_ids, result, notes + _shared_images(result))


def _shared_images(splits: dict[str, DetectionSplit]) -> list[str]:
    """Notes on image files used by two splits: evaluation on training images flatters the model."""
    files = {name: {r.file for r in split.records} for name, split in splits.items()}
    names = list(files)
    notes = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if shared := len(files[first] & files[second]):
                notes.append(f"splits {first} and {second} share {shared} image files")
    return notes


def split_name(name: str) -> str:
    """The canonical split name: val and validation are valid."""
    for canonical, aliases in SPLIT_ALIASES.items():
        if name in aliases:
            return canonical
    return name


def _resolve_splits(root: PathLike | None,
                    splits: dict[str, tuple[PathLike, PathLike]] | None) -> dict[str, tuple[Path, Path]]:
    if splits is None:
        if root is None:
            raise ValueError("load_dataset needs a root folder or explicit splits")
        return discover_splits(root)
    if not splits:
        raise ValueError("load_dataset: splits is empty")
    base = Path(root) if root is not None else None
    out: dict[str, tuple[Path, Path]] = {}
    for name, (ann, img) in splits.items():
        ann, img = Path(ann), Path(img)
        if base is not None:  # an absolute path stays as it is under "/"
            ann, img = base / ann, base / img
        if split_name(name) in out:
            raise ValueError(f"load_dataset: split {name!r} given twice (as {split_name(name)!r})")
        out[split_name(name)] = (ann, img)
    return out


def discover_splits(root: PathLike) -> dict[str, tuple[Path, Path]]:
    """Find (ann_file, img_dir) per split in a Roboflow or COCO layout (raises DataError)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder {'is a file' if root.exists() else 'not found'}")
    found: dict[str, tuple[Path, Path]] = {}
    folders: dict[str, Path] = {}  # split folders that exist, with or without annotations
    for name, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            folder = root / alias
            if (folder / ROBOFLOW_ANN).is_file():
                found[name] = (folder / ROBOFLOW_ANN, folder)
                break
            if folder.is_dir():
                folders.setdefault(name, folder)
    if not found and not folders:
        coco = _discover_coco_layout(root)
        if coco:
            return coco
        if (root / ROBOFLOW_ANN).is_file():
            raise DataError(f"{root}: holds {ROBOFLOW_ANN} itself, i.e. one split; give the folder above "
                            "it (with train/ and valid/) or name each split's files explicitly")
        raise DataError(f"{root}: no dataset found (expected train/{ROBOFLOW_ANN} and valid/{ROBOFLOW_ANN}, "
                        "or annotations/instances_train*.json and instances_val*.json)")
    for name in REQUIRED_SPLITS:
        if name not in found:
            if name in folders:
                raise DataError(f"{folders[name] / ROBOFLOW_ANN}: annotation file not found")
            raise DataError(f"{root}: no {name}/ split (expected {name}/{ROBOFLOW_ANN}); a Roboflow "
                            "export needs train/ and valid/")
    return found


def _discover_coco_layout(root: Path) -> dict[str, tuple[Path, Path]]:
    """annotations/instances_<split><year>.json with images in <split><year>/ or images/<split><year>/."""
    found: dict[str, tuple[Path, Path]] = {}
    for ann in sorted((root / "annotations").glob("instances_*.json")):
        stem = ann.stem.removeprefix("instances_")
        match = re.fullmatch(r"(train|val|valid|validation|test)[\w-]*", stem)
        if not match:
            continue
        candidates = [root / stem, root / "images" / stem, root / match.group(1)]
        img_dir = next((c for c in candidates if c.is_dir()), candidates[0])
        found.setdefault(split_name(match.group(1)), (ann, img_dir))
    return found if all(name in found for name in REQUIRED_SPLITS) else {}


def build_classes(files: dict[str, CocoFile]) -> tuple[list[str], list[int], list[str]]:
    """One class list over all splits: (names, original category ids, notes on dropped ones)."""
    named: dict[int, tuple[str, Path]] = {}
    for coco in files.values():
        for cat_id, cat_name in coco.categories.items():
            if cat_id in named and named[cat_id][0] != cat_name:
                raise DataError(f'{coco.path}: category id {cat_id} is "{cat_name}" but '
                                f'{named[cat_id][1]} names it "{named[cat_id][0]}"')
            named.setdefault(cat_id, (cat_name, coco.path))
    used = {ann.category_id for coco in files.values() for image in coco.images for ann in image.annotations}
    if not used:
        raise DataError(f"{', '.join(str(c.path) for c in files.values())}: no boxes in any split")
    category_ids = sorted(used)
    classes = [named[c][0] for c in category_ids]
    by_name: dict[str, int] = {}
    for cat_id, name in zip(category_ids, classes):
        if name in by_name:
            raise DataError(f'{named[cat_id][1]}: categories {by_name[name]} and {cat_id} are both named '
                            f'"{name}"; class names must be unique')
        by_name[name] = cat_id
    notes = [f'category id {c} "{named[c][0]}" has no boxes in any split; not a class'
             + (" (Roboflow's supercategory)" if c == 0 else "")
             for c in sorted(set(named) - used)]
    return classes, category_ids, notes


class _Tally:
    """Counts per reason, the first example of each, and boxes lost with skipped images."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.lost_boxes: Counter = Counter()

    def add(self, reason: str, count: int, example: str) -> None:
        if count:
            self.counts[reason] += int(count)
            self.examples.setdefault(reason, example)

    def log(self, coco: CocoFile, split: str) -> None:
        for reason, count in self.counts.items():
            lost = self.lost_boxes[reason]
            extra = f", with {lost} boxes" if lost else ""
            logger.warning("%s: %s split: %d %s%s; e.g. %s", coco.path, split, count,
                           REASONS.get(reason, reason), extra, self.examples[reason])


def _build_split(name: str, coco: CocoFile, img_dir: Path, label_of: dict[int, int],
                 check_images: bool, masks: bool = False) -> DetectionSplit:
    if not img_dir.is_dir():
        raise DataError(f'{img_dir}: image folder of the "{name}" split not found')
    if not coco.images:
        raise DataError(f'{coco.path}: empty split "{name}": the file lists no images')
    base = img_dir.resolve()  # the path rule of this module's docstring
    paths = [_image_path(base, image.file_name, check_images) for image in coco.images]
    _check_unique_files(coco, paths)
    probes = probe_images(paths, desc=f"checking {name} images") if check_images else [None] * len(paths)
    _check_missing(name, coco, img_dir, probes)
    tally = _Tally()
    records = []
    for image, path, probe in zip(coco.images, paths, probes):
        if probe is not None and probe.status != "ok":
            tally.add(probe.status, 1, f"image id {image.image_id} {image.file_name!r} ({probe.detail})")
            tally.lost_boxes[probe.status] += len(image.annotations)
            continue
        width, height, rotation = _image_size(image, probe, tally)
        records.append(_make_record(image, path, width, height, rotation, label_of, tally,
                                    coco.path if masks else None))
    tally.log(coco, name)
    if not records:
        reasons = ", ".join(f"{r}: {c}" for r, c in tally.counts.items())
        raise DataError(f'{coco.path}: empty split "{name}": no usable image ({reasons})')
    return DetectionSplit(name, coco.path.resolve(), base, records, tally.counts)


def _image_path(base: Path, file_name: str, look: bool) -> Path:
    # Exports made on Windows use backslashes; some tools prefix the split folder to the name.
    path = base / file_name.replace("\\", "/")
    if look and not path.exists() and (base / path.name).exists():
        return base / path.name
    return path


def _check_unique_files(coco: CocoFile, paths: list[Path]) -> None:
    owner: dict[Path, int] = {}
    for image, path in zip(coco.images, paths):
        if path in owner:
            raise DataError(f"{coco.path}: image ids {owner[path]} and {image.image_id} both name the "
                            f"file {image.file_name!r}")
        owner[path] = image.image_id


def _check_missing(name: str, coco: CocoFile, img_dir: Path, probes: list[ImageProbe | None]) -> None:
    """Few missing files are skipped; most missing means the wrong image folder: an error."""
    missing = [i for i, p in enumerate(probes) if p is not None and p.status == "missing_image"]
    total = len(probes)
    if not missing or 2 * len(missing) <= total:
        return
    first = coco.images[missing[0]].file_name
    if len(missing) == total:
        raise DataError(f'{coco.path}: empty split "{name}": none of its {total} images are in {img_dir} '
                        f"(first: {first!r})")
    raise DataError(f'{coco.path}: split "{name}": {len(missing)} of {total} images are missing from '
                    f"{img_dir} (first: {first!r}); is the image folder right?")


def _image_size(image: RawImage, probe: ImageProbe | None,
                tally: _Tally) -> tuple[int, int, tuple[int, int, int] | None]:
    """(width, height, (orientation, raw_w, raw_h) when boxes must be rotated, else None)."""
    if probe is None:
        return image.width, image.height, None
    width, height = probe.width, probe.height
    if image.width is None or image.height is None or (image.width, image.height) == (width, height):
        return width, height, None
    label = f"image id {image.image_id} {image.file_name!r}"
    if probe.orientation in TRANSPOSING_ORIENTATIONS and (image.width, image.height) == (height, width):
        tally.add("exif_rotated", 1, f"{label}: JSON size {image.width}x{image.height} is the stored size, "
                                     f"EXIF orientation {probe.orientation} makes it {width}x{height}")
        return width, height, (probe.orientation, image.width, image.height)
    tally.add("size_mismatch", 1, f"{label}: JSON says {image.width}x{image.height}, "
                                  f"the pixels are {width}x{height}")
    return width, height, None


def _make_record(image: RawImage, path: Path, width: int, height: int,
                 rotation: tuple[int, int, int] | None, label_of: dict[int, int],
                 tally: _Tally, masks_of: Path | None = None) -> ImageRecord:
    """masks_of: the annotation file, when the boxes' segmentations are to be read too."""
    anns = image.annotations
    xywh = np.array([a.bbox for a in anns], np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    if rotation is not None:
        xyxy = raw_to_oriented(xyxy, *rotation).astype(np.float64)
    keep, boxes, reasons = clean_boxes(xyxy, width, height)
    for reason, mask in reasons.items():
        if mask.any():
            ann = anns[int(np.argmax(mask))]
            bbox = "[" + ", ".join(f"{v:g}" for v in ann.bbox) + "]"
            tally.add(reason, int(mask.sum()), f"annotation id {ann.ann_id} bbox {bbox} on image id "
                                               f"{image.image_id} ({width}x{height})")
    kept = [anns[i] for i in keep]
    crowd = np.array([a.crowd for a in kept], bool)
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    areas = np.array([a.area if a.area is not None else box_area[i] for i, a in enumerate(kept)], np.float32)
    labels = np.array([label_of[a.category_id] for a in kept], np.int64)
    record = ImageRecord(
        image_id=image.image_id, file=path, width=width, height=height,
        boxes=boxes[~crowd].reshape(-1, 4), labels=labels[~crowd], areas=areas[~crowd].reshape(-1),
        crowd_boxes=boxes[crowd].reshape(-1, 4), crowd_labels=labels[crowd],
    )
    if masks_of is None:
        return record
    return _with_masks(record, [a for a, c in zip(kept, crowd) if not c], rotation, tally, masks_of)


def _with_masks(record: ImageRecord, box_anns: list, rotation: tuple[int, int, int] | None, tally: _Tally,
                ann_file: Path) -> ImageRecord:
    """The record with each box's checked segmentation (box_anns: the annotations of its boxes, in
    order); boxes without a usable one dropped and counted."""
    keep, segms = [], []
    for k, ann in enumerate(box_anns):
        where = f"annotation id {ann.ann_id} on image id {record.image_id} ({record.width}x{record.height})"
        segm = ann.segmentation
        if rotation is not None and isinstance(segm, dict):
            tally.add("rle_on_rotated_image", 1, where)
            continue
        if rotation is not None and isinstance(segm, list):
            segm = [raw_points_to_oriented(np.asarray(p, np.float64).reshape(-1, 2), *rotation).reshape(-1).tolist()
                    if isinstance(p, list) else p for p in segm]
        try:
            reasons, usable = check_segmentation(segm, record.height, record.width)
        except DataError as exc:
            raise DataError(f"{ann_file}: {where}: {exc}") from None
        for reason in reasons:
            tally.add(reason, 1, where)
        if usable is not None:
            keep.append(k)
            segms.append(usable)
    keep_idx = np.asarray(keep, np.int64)
    return replace(record, boxes=record.boxes[keep_idx].reshape(-1, 4), labels=record.labels[keep_idx],
                   areas=record.areas[keep_idx], segmentations=segms)


def summarize(dataset: DetectionDataset) -> dict:
    """What check-data prints: classes, per split images/boxes/per_class/warnings, and notes."""
    num_classes = len(dataset.classes)
    splits = {}
    for name, split in dataset.splits.items():
        per_class = np.zeros(num_classes, np.int64)
        for record in split.records:
            per_class += np.bincount(record.labels, minlength=num_classes)
        ordered = [r for r in REASONS if split.warnings.get(r)] + sorted(set(split.warnings) - set(REASONS))
        splits[name] = {
            "images": len(split.records),
            "boxes": int(per_class.sum()),
            "per_class": {c: int(n) for c, n in zip(dataset.classes, per_class)},
            "crowd_boxes": sum(len(r.crowd_boxes) for r in split.records),
            "images_without_boxes": sum(1 for r in split.records if len(r.boxes) == 0),
            "warnings": {r: int(split.warnings[r]) for r in ordered if split.warnings[r]},
        }
    return {"classes": list(dataset.classes), "splits": splits, "notes": list(dataset.notes)}
