"""`rtmdet check-data`: validate a dataset and report images, boxes, classes and skipped items."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rtmdet.data.coco import load_dataset, summarize
from rtmdet.data.validate import REASONS
from rtmdet.errors import ConfigError

SPLITS = ("train", "valid", "test")
LAYOUTS = ("auto", "coco", "classes", "dota")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the check-data sub-command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "check-data",
        help="validate a COCO / Roboflow dataset and print what it holds",
        description="Validate a detection dataset (Roboflow export, COCO layout, or explicit annotation "
                    "files and image folders) and print, per split, images, boxes, boxes per class and "
                    "every skipped or changed item counted per reason. Exit status 0 when the data is "
                    "usable; otherwise the one-line error and a non-zero status.",
    )
    parser.add_argument("root", nargs="?", type=Path,
                        help="dataset folder: train/ valid/ [test/] each with _annotations.coco.json, "
                             "or annotations/instances_*.json; with --*-ann, paths are relative to it")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--no-images", action="store_true",
                        help="check the JSON only; do not open the image files")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="coco (boxes, and the default), classes (train/<class>/<image>: a classifier's data) "
                             "or dota (images/ + labelTxt/: rotated boxes); auto tells them apart")
    add_split_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """--<split>-ann FILE / --<split>-img DIR for the explicit layout (shared by data commands)."""
    for split in SPLITS:
        parser.add_argument(f"--{split}-ann", type=Path, metavar="FILE",
                            help=f"COCO annotation file of the {split} split")
        parser.add_argument(f"--{split}-img", type=Path, metavar="DIR",
                            help=f"image folder of the {split} split (default: the folder of --{split}-ann)")


def explicit_splits(args: argparse.Namespace, command: str = "check-data",
                    need_train: bool = True) -> dict[str, tuple[Path, Path]] | None:
    """The --<split>-ann/--<split>-img pairs, or None when none were given."""
    splits = {}
    for split in SPLITS:
        ann, img = getattr(args, f"{split}_ann", None), getattr(args, f"{split}_img", None)
        if img is not None and ann is None:
            raise ConfigError(f"{command}: --{split}-img needs --{split}-ann")
        if ann is not None:
            # A Roboflow-style split keeps its images beside the annotation file.
            splits[split] = (ann, img if img is not None else ann.parent)
    if need_train and splits and "train" not in splits:
        raise ConfigError(f"{command}: explicit splits need at least --train-ann")
    return splits or None


def layout_of(root: Path | None, explicit: bool) -> str:
    """auto: dota when train/ holds labelTxt/ or annfiles/; classes when train/ holds only
    folders and no COCO file; otherwise coco."""
    if explicit or root is None or not (root / "train").is_dir():
        return "coco"
    train = root / "train"
    if (train / "labelTxt").is_dir() or (train / "annfiles").is_dir():
        return "dota"
    if not (train / "_annotations.coco.json").exists() and not (root / "annotations").is_dir() \
            and any(p.is_dir() for p in train.iterdir()):
        return "classes"
    return "coco"


def run(args: argparse.Namespace) -> int:
    """Run check-data; print the report to stdout and return 0 (raises RTMDetError when unusable)."""
    splits = explicit_splits(args)
    if splits is None and args.root is None:
        raise ConfigError("check-data: give a dataset folder or --train-ann/--valid-ann")
    layout = layout_of(args.root, splits is not None) if args.layout == "auto" else args.layout
    if layout == "classes":
        from rtmdet.data.class_folders import load_class_folders, summarize as summarize_classes

        summary = summarize_classes(load_class_folders(args.root, check_images=not args.no_images))
    elif layout == "dota":
        from rtmdet.data.dota import load_dota, summarize as summarize_dota

        summary = summarize_dota(load_dota(args.root))
    else:
        summary = summarize(load_dataset(args.root, splits=splits, check_images=not args.no_images))
    if args.json:
        print(json.dumps(summary if layout == "coco" else {"layout": layout, **summary}, indent=2, ensure_ascii=False))
    else:
        print(format_report(summary) if layout == "coco" else format_other(summary, layout))
    return 0


def format_other(summary: dict, layout: str) -> str:
    """The report of a class-folder or DOTA dataset: per split, images (and boxes), per class, warnings."""
    from rtmdet.data import class_folders, dota

    reasons = class_folders.REASONS if layout == "classes" else dota.REASONS
    classes = summary["classes"]
    width = max(len(c) for c in classes)
    lines = [f"{layout} layout; classes ({len(classes)}): {', '.join(classes)}"]
    for name, split in summary["splits"].items():
        boxes = f", {split['boxes']} rotated boxes ({split['difficult']} difficult)" if "boxes" in split else ""
        lines.append(f"{name}: {split['images']} images{boxes}")
        lines += [f"  {c:<{width}}  {n:>7}" for c, n in split["per_class"].items()]
        lines += [f"  warning {k}: {n} {reasons.get(k, '')}".rstrip() for k, n in split["warnings"].items()]
        if not split["warnings"]:
            lines.append("  no warnings")
    return "\n".join(lines + ["usable"])


def format_report(summary: dict) -> str:
    """The human-readable report of a summarize() dict."""
    classes = summary["classes"]
    width = max(len(c) for c in classes)
    lines = [f"classes ({len(classes)}): {', '.join(classes)}"]
    for name, split in summary["splits"].items():
        extra = [f"{split[k]} {k.replace('_', ' ')}"
                 for k in ("crowd_boxes", "images_without_boxes") if split.get(k)]
        lines.append(f"{name}: {split['images']} images, {split['boxes']} boxes"
                     + (f" ({', '.join(extra)})" if extra else ""))
        lines += [f"  {c:<{width}}  {n:>7}" for c, n in split["per_class"].items()]
        if split["warnings"]:
            lines += [f"  warning {reason}: {count} {REASONS.get(reason, '')}".rstrip()
                      for reason, count in split["warnings"].items()]
        else:
            lines.append("  no warnings")
    lines += [f"note: {note}" for note in summary["notes"]]
    warned = sum(sum(s["warnings"].values()) for s in summary["splits"].values())
    lines.append("usable" + (f", with {warned} skipped or changed items (see warnings)" if warned else ""))
    return "\n".join(lines)
