"""`rtmdet crops`: a detection dataset's boxes as a class-folder classification dataset.

    rtmdet crops data/facemask --out data/facemask_crops [--pad 0.1] [--min-size 8]

Each box of train, valid and test becomes out/<split>/<class>/<image id>_<k>.jpg (valid is
written as val), the box grown by `pad` of its size on every side and clipped to the image, so a
detection user can train a classifier, or pretrain a backbone, on their own objects. Boxes under
min_size pixels on a side are skipped and counted. The whole folder is written beside `out` and
renamed into place at the end: a killed run leaves no half-made dataset.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from rtmdet.data.records import DetectionDataset
from rtmdet.errors import ConfigError, DataError
from rtmdet.fileio import write_json_atomic
from rtmdet.imageio import read_image

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "valid": "val", "test": "test"}


def crop_box(image: np.ndarray, box: np.ndarray, pad: float) -> np.ndarray:
    """The xyxy box grown by `pad` x its width/height on each side, clipped to the image."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = pad * (x2 - x1), pad * (y2 - y1)
    left, top = max(int(np.floor(x1 - dx)), 0), max(int(np.floor(y1 - dy)), 0)
    right, bottom = min(int(np.ceil(x2 + dx)), w), min(int(np.ceil(y2 + dy)), h)
    return image[top:bottom, left:right]


def write_crops(dataset: DetectionDataset, out: Path, pad: float = 0.1, min_size: int = 8,
                quality: int = 95) -> dict:
    """Write every split's box crops under `out` (replaced as a whole); returns the summary."""
    if pad < 0 or min_size < 1:
        raise ConfigError(f"crops: pad must be >= 0 and min_size >= 1, got pad {pad}, min_size {min_size}")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        summary = {"classes": dataset.classes, "pad": pad, "min_size": min_size, "splits": {}}
        for split, records in ((s, dataset.splits[s].records) for s in SPLIT_NAMES if s in dataset.splits):
            counts, skipped = Counter(), Counter()
            for record in records:
                if not len(record.boxes):
                    continue
                image = read_image(record.file)
                for k, (box, label) in enumerate(zip(record.boxes, record.labels)):
                    if min(box[2] - box[0], box[3] - box[1]) < min_size:
                        skipped["small_box"] += 1
                        continue
                    name = dataset.classes[int(label)]
                    folder = tmp / SPLIT_NAMES[split] / _folder_name(name)
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"{record.image_id}_{k}.jpg"
                    ok, data = cv2.imencode(".jpg", crop_box(image, box, pad), [cv2.IMWRITE_JPEG_QUALITY, quality])
                    if not ok:
                        raise DataError(f"{record.file}: box {k} could not be encoded as a JPEG crop")
                    data.tofile(path)
                    counts[name] += 1
            if skipped:
                log.warning("%s: %d box(es) under %d px on a side skipped", split, skipped["small_box"], min_size)
            summary["splits"][SPLIT_NAMES[split]] = {"crops": sum(counts.values()), "per_class": dict(counts),
                                                     "skipped": dict(skipped)}
        if not summary["splits"].get("train", {}).get("crops"):
            raise DataError(f"{out}: no crops from the train split (no boxes of at least {min_size} px)")
        write_json_atomic(tmp / "crops.json", summary)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _folder_name(name: str) -> str:
    """A class name as a folder name (path separators and leading dots would escape the split)."""
    safe = name.replace("/", "_").replace("\\", "_").strip()
    return safe if safe and not safe.startswith(".") else f"_{safe}"


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


# ---- the sub-command ------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the crops sub-command."""
    from rtmdet.data.check import add_split_arguments

    parser = subparsers.add_parser(
        "crops", help="turn a detection dataset's boxes into a class-folder classification dataset",
        description="Write each box of a detection dataset (train, valid, test) as a JPEG crop under "
                    "OUT/<split>/<class>/ (valid becomes val), for training a classifier or pretraining a "
                    "backbone on your own objects.")
    parser.add_argument("root", nargs="?", type=Path, help="detection dataset folder (as for check-data)")
    parser.add_argument("--out", type=Path, required=True, help="the classification dataset folder to write")
    parser.add_argument("--pad", type=float, default=0.1, help="grow each box by this fraction per side (0.1)")
    parser.add_argument("--min-size", type=int, default=8, help="skip boxes under this many pixels on a side (8)")
    add_split_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from rtmdet.data.check import explicit_splits
    from rtmdet.data.coco import load_dataset

    splits = explicit_splits(args, command="crops")
    if splits is None and args.root is None:
        raise ConfigError("crops: give a dataset folder or --train-ann/--valid-ann")
    summary = write_crops(load_dataset(args.root, splits=splits), args.out, args.pad, args.min_size)
    for split, s in summary["splits"].items():
        print(f"{split}: {s['crops']} crops " + ", ".join(f"{c} {n}" for c, n in sorted(s["per_class"].items())))
    print(f"wrote {args.out}")
    return 0
