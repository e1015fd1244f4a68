"""`rtmdet train`: train (or resume) an RTMDet from params.yaml, with command-line overrides.

The params file gives the data/model/train sections; the common knobs have their own flags
and `--set section.key=value` reaches every other key, checked like params.yaml itself. The
command starts train.gpus ranks itself (auto: every visible GPU); under torchrun (several nodes)
each rank runs it as the rank it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rtmdet.errors import ConfigError

# flag dest -> (section, key)
_FLAGS = {
    "data": ("data", "root"), "size": ("model", "size"), "imgsz": ("model", "imgsz"), "init": ("model", "init"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "device": ("train", "device"),
    "workers": ("train", "workers"), "seed": ("train", "seed"), "gpus": ("train", "gpus"),
    "teacher": ("train", "teacher"), "task": ("model", "task"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the train sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train", help="train an RTMDet on a COCO/Roboflow dataset (resumes a killed run)",
        description="Train with mmdetection's RTMDet recipe. OUT/last.pt holds the EMA weights and the resume "
                    "state: running the same command again continues a killed run where it stopped, and returns "
                    "at once when it has finished; changed params start a new run. OUT/best.pt holds the EMA "
                    "weights with the best validation mAP. The lr is train.lr x total batch / "
                    "train.base_batch_size (total batch = --batch-size x number of GPUs).")
    p.add_argument("--params", type=Path, default=None, metavar="YAML",
                   help="params file with data/model/train sections (default: params.yaml when present)")
    p.add_argument("--data", metavar="ROOT", help="dataset folder (Roboflow train/ valid/, or COCO annotations/)")
    p.add_argument("--size", help="model size: nano, tiny, s, m, l, x")
    p.add_argument("--imgsz", type=int, help="training and validation image size (multiple of 32)")
    p.add_argument("--task", choices=("detect", "segment", "classify"),
                   help="detect (boxes, the default), segment (RTMDet-Ins: boxes and instance masks; best.pt "
                        "follows the mask mAP) or classify (a CSPNeXt classifier on class folders "
                        "root/train/<class>/, root/val/<class>/; best.pt follows the top-1)")
    p.add_argument("--init", metavar="CKPT", help="start from a CSPNeXt backbone or a full RTMDet checkpoint")
    p.add_argument("--teacher", metavar="CKPT|SIZE",
                   help="distill from this detector checkpoint, or from a teacher of this size trained first "
                        "into OUT-teacher (same data, classes and image size)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per GPU (the lr scales with the total)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--gpus", type=_gpus, help="ranks to start, one per GPU: auto (every visible GPU) or N")
    p.add_argument("--workers", type=int, help="data-loading processes per GPU")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any data/model/train key, e.g. --set train.lr=0.002 (repeatable)")
    p.add_argument("--out", type=Path, default=Path("runs/train"), metavar="DIR",
                   help="checkpoint folder (default runs/train)")
    p.add_argument("--live", type=Path, default=None, metavar="DIR",
                   help="dvclive folder for the training curves (default OUT/dvclive)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _gpus(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def resolve_params(args: argparse.Namespace) -> dict[str, Any]:
    """The data/model/train sections from --params (or defaults), with flags and --set applied."""
    from rtmdet.config import SECTIONS, as_dict, load_params, parse_section

    names = ("data", "model", "train")
    path = args.params if args.params is not None else Path("params.yaml")
    if args.params is not None or path.is_file():
        raw = {name: as_dict(sec) for name, sec in load_params(path, names).items()}
    else:
        raw = {name: as_dict(SECTIONS[name]()) for name in names}
    for dest, (section, key) in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            raw[section][key] = value
    for item in args.set:
        target, sep, value = item.partition("=")
        section, dot, key = target.partition(".")
        if not sep or not dot or section not in names:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(names)}")
        raw[section][key] = _parse_value(value)
    return {name: parse_section(name, raw[name]) for name in names}


def run(args: argparse.Namespace) -> int:
    """Train; log where the checkpoints are and the best mAP."""
    import logging
    import os

    from rtmdet.training.launch import train_with_teacher

    log = logging.getLogger("rtmdet.train")
    params = resolve_params(args)
    live = args.live if args.live is not None else args.out / "dvclive"
    result, teacher = train_with_teacher(params["data"], params["model"], params["train"], args.out,
                                         args.out.with_name(args.out.name + "-teacher"), live_dir=live,
                                         progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = "n/a" if result.best_mAP is None else f"{result.best_mAP:.4f} (epoch {result.best_epoch})"
    what = {"segment": "mask mAP", "classify": "top-1"}.get(params["model"].task, "mAP")
    if teacher is not None and teacher.best_mAP is not None:
        log.info("teacher: %s (best mAP %.4f)", teacher.best or teacher.last, teacher.best_mAP)
    log.info("done: %s (best %s %s), %s", result.best or "no best.pt", what, best, result.last)
    return 0
