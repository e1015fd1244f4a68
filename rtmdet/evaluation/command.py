"""`rtmdet evaluate`: COCO bbox scores of a checkpoint on a dataset split, with optional reports."""

from __future__ import annotations

import argparse
from pathlib import Path

from rtmdet.data.check import add_split_arguments, explicit_splits
from rtmdet.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the evaluate sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on a dataset split with COCO bbox metrics",
        description="Run a checkpoint over a split and print pycocotools' 12 standard numbers and AP per "
                    "class. With --out, also write the evaluate stage's reports there: "
                    "metrics/evaluate.json, per-class tables, PR curves, confusion matrix, per-class AP "
                    "bars, a worst-images-first grid and the COCO results file.",
    )  # fmt: skip
    p.add_argument("--weights", required=True, type=Path, help="checkpoint (.pt/.pth, rtmdet or mmdetection)")
    p.add_argument("--data", type=Path, metavar="ROOT",
                   help="dataset folder (Roboflow train/ valid/ [test/], or COCO annotations/); with "
                        "--*-ann, their paths are relative to it")  # fmt: skip
    p.add_argument("--split", nargs="+", default=["valid"], metavar="NAME",
                   help="split(s) to score (default: valid)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write the reports under this folder (default: print only)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--imgsz", type=int, default=None, help="inference size (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--conf-thr", type=float, default=0.3,
                   help="score threshold of the confusion matrix and the worst-images grid (default 0.3); "
                        "COCO scoring always uses every detection down to 0.001")  # fmt: skip
    p.add_argument("--grid-images", type=int, default=16, help="images in the worst-first grid (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_split_arguments(p)
    p.set_defaults(func=run)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.imgsz is not None and (args.imgsz <= 0 or args.imgsz % 32):
        raise ConfigError(f"--imgsz {args.imgsz} is not a positive multiple of 32")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if not 0.0 <= args.conf_thr <= 1.0:
        raise ConfigError(f"--conf-thr {args.conf_thr} must be between 0 and 1")
    if args.grid_images < 0:
        raise ConfigError(f"--grid-images {args.grid_images} must not be negative")


def run(args: argparse.Namespace) -> int:
    """Score, print the COCO table per split and, with --out, write the reports."""
    from rtmdet.data.coco import load_dataset, split_name
    from rtmdet.evaluation.coco_eval import evaluate_detector, format_coco_table
    from rtmdet.evaluation.stage import METRICS_FILE, REPORT_DIR, evaluate_splits, select_splits
    from rtmdet.inference.predict import resolve_device
    from rtmdet.inference.predictor import Detector

    _check_args(args)
    device = resolve_device(args.device)
    splits = explicit_splits(args, "evaluate", need_train=False)
    if splits is None and args.data is None:
        raise ConfigError("evaluate: give --data ROOT or --valid-ann FILE (and --*-ann for other splits)")
    dataset = load_dataset(args.data, splits=splits)
    chosen = select_splits(dataset, [split_name(s) for s in args.split], require_all=True)
    detector = Detector.from_checkpoint(args.weights, device=device, image_size=args.imgsz,
                                        batch_size=args.batch_size)  # fmt: skip
    progress = not args.no_progress
    if args.out is not None:
        results = evaluate_splits(detector, dataset, args.out, chosen, score_thr_confusion=args.conf_thr,
                                  grid_images=args.grid_images, batch_size=args.batch_size,
                                  progress=progress)  # fmt: skip
    else:
        results = {name: evaluate_detector(detector, dataset.splits[name], dataset,
                                           batch_size=args.batch_size, progress=progress)
                   for name in chosen}  # fmt: skip
    for name, result in results.items():
        if len(results) > 1:
            print(f"== {name} ==")
        print(format_coco_table(result))
    if args.out is not None:
        print(f"\nreports: {args.out / REPORT_DIR}, metrics: {args.out / METRICS_FILE}")
    return 0
