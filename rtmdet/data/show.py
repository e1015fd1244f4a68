"""`rtmdet show-data`: a grid PNG of augmented training samples with their boxes and class names.

It runs the real training pipeline (the same keys, caches and seeds as a training batch), so
what you see is what the model is fed: check that boxes sit on the objects and names are right.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from rtmdet.data.loader import TrainBatchSampler, TrainDataset
from rtmdet.data.pipeline import PipelineConfig, make_batch
from rtmdet.data.records import ImageRecord
from rtmdet.errors import DataError
from rtmdet.visualize import draw_boxes

MIN_TILE = 320  # small training sizes are upscaled so captions stay readable
GAP = 4
HEADER = 28


def _tile(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, classes: Sequence[str], side: int) -> np.ndarray:
    scale = side / image.shape[0]
    if scale != 1:
        image = cv2.resize(image, (side, side), interpolation=cv2.INTER_NEAREST)
    return draw_boxes(image, boxes * scale, labels, classes)


def draw_augmented_grid(
    records: Sequence[ImageRecord],
    classes: Sequence[str],
    out_png: str | Path,
    imgsz: int,
    n: int = 16,
    seed: int = 0,
    stage: int = 1,
    size: str = "tiny",
    epoch: int = 0,
) -> Path:
    """Write a grid of n augmented samples (batch 0 of `epoch`) to out_png; returns its path."""
    dataset = TrainDataset(records, PipelineConfig.for_size(size, imgsz))
    sampler = TrainBatchSampler(len(dataset), n, seed=seed)
    sampler.set_epoch(epoch, stage)
    samples = make_batch(next(iter(sampler)), dataset, dataset.config)
    side = max(imgsz, MIN_TILE)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((HEADER + rows * (side + GAP), cols * (side + GAP) - GAP, 3), 255, np.uint8)
    title = f"{size} recipe, stage {stage}, {imgsz} px, seed {seed}, epoch {epoch}: {n} training samples"
    cv2.putText(grid, title, (6, HEADER - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for i, s in enumerate(samples):
        r, c = divmod(i, cols)
        y, x = HEADER + r * (side + GAP), c * (side + GAP)
        grid[y : y + side, x : x + side] = _tile(s.image, s.boxes, s.labels, classes, side)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", grid)
    if not ok:
        raise DataError(f"{out}: could not encode the PNG")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data.tobytes())
    os.replace(tmp, out)  # atomic: never a half-written PNG
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the show-data sub-command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "show-data",
        help="draw augmented training samples with their boxes to a PNG grid",
        description="Run RTMDet's training augmentation (stage 1: cached mosaic, random resize and crop, "
                    "HSV, flip, mixup; stage 2: the same without mosaic and mixup) on a dataset and "
                    "save a grid of the resulting samples with boxes and class names drawn.",
    )
    parser.add_argument("root", type=Path, help="dataset folder (Roboflow or COCO layout)")
    parser.add_argument("--split", default="train", help="split to sample from (default: train)")
    parser.add_argument("--out", type=Path, default=Path("show_data.png"), help="output PNG (default: show_data.png)")
    parser.add_argument("--imgsz", type=int, default=320, help="training image size (default: 320)")
    parser.add_argument("--size", default="tiny", help="model size whose recipe to use: nano tiny s m l x")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="pipeline stage (default: 1)")
    parser.add_argument("-n", "--num", type=int, default=16, help="number of samples (default: 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=0)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the dataset, draw the grid and print where it went."""
    from rtmdet.data.coco import (
        load_dataset,  # the reader is only needed by this command
    )

    data = load_dataset(args.root)
    if args.split not in data.splits:
        raise DataError(f"{args.root}: no split {args.split!r} (found: {', '.join(data.splits)})")
    records = data.splits[args.split].records
    out = draw_augmented_grid(
        records, data.classes, args.out, args.imgsz, args.num, args.seed, args.stage, args.size, args.epoch
    )
    print(f"wrote {out} ({args.num} {args.split} samples, stage {args.stage}, {args.imgsz} px)")
    return 0
