"""The `verify` stage for an RTMDet-R (model.task rotate): every format scored by rotated mAP.

The checkpoint and each export (found as for detectors: rtmdet.export.verify.find_exports) run
through the same RotatedPredictor letterbox and post-process (rtmdet.export.rotated.RotatedRunner)
and are scored by rtmdet.evaluation.rotated_eval.score_rotated, on the CPU with a fixed thread
count. verify.json has the detector's layout (split, threads, formats) plus `task: rotate`, the
metric and the post-process settings; each row holds mAP (DOTA-style mAP50:95, VOC07 11-point AP
at rotated IoU 0.50:0.05:0.95), mAP50, mAP75, `drop` (torch mAP minus the format's), the file
size, the median latency of one image through the backend (letterboxed tensor in, raw head outputs
back) and, for .tflite files, their operators. max_drop / int8_max_drop limit the mAP drop.

The post-process is mmrotate's test_cfg (score 0.05, rotated NMS IoU 0.1), as the training
validator scores: on boxes_obb valid (RTMDet-R-tiny, 640 px) a 0.001 threshold with 300 boxes
per image gave the same mAP (0.82732 both) at 7x the CPU time (435 s against 60 s for 56 images:
the rotated NMS over thousands of candidates per image).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rtmdet.data.dota import RotatedDataset, RotatedSplit
from rtmdet.export.verify import FORMAT_ORDER, FormatScore, VerifyError, find_exports, latency_ms, publish
from rtmdet.failpoints import kill_point
from rtmdet.inference.rotated import RotatedPostprocessConfig

log = logging.getLogger(__name__)

TASK = "rotate"
METRIC = "mAP50:95 (rotated IoU, VOC07 11-point AP)"
VALIDATION_NAMES = ("valid", "val", "validation")


class RotatedScore(FormatScore):
    """One format's rotated mAP on the split, its size and latency."""

    def row(self, torch_map: float | None, torch_mask_map: float | None = None) -> dict[str, Any]:
        m = self.metrics
        row = {"mAP": m["mAP"], "mAP50": m["mAP50"], "mAP75": m["mAP75"],
               "drop": None if torch_map is None else round(torch_map - m["mAP"], 5),
               "size_mb": round(self.size_mb, 3), "latency_ms": round(self.latency_ms, 2), "file": str(self.path)}
        if self.path.suffix == ".tflite":  # what a runtime must implement to run the file
            from rtmdet.export.backends import tflite_operators

            row["operators"] = tflite_operators(self.path)
        return row


def rotated_split(dataset: RotatedDataset, split: str) -> RotatedSplit:
    """The split named `split`; the stage's "valid" is whichever of val/ and valid/ the dataset has."""
    found = dataset.splits.get(split) or (dataset.validation() if split in VALIDATION_NAMES else None)
    if found is None:
        raise VerifyError(f"split {split!r} not in the dataset (splits: {', '.join(dataset.splits)})")
    return found


def open_runners(weights: Path, exports: dict[str, Path], classes: list[str], threads: int, batch_size: int,
                 postprocess: RotatedPostprocessConfig) -> list[tuple[str, Path, Any]]:
    """(format, file, RotatedRunner) of the checkpoint and every export, all opened (their classes
    checked against the dataset's) before any is scored: a bad file fails at once, in one line."""
    from rtmdet.export.rotated import rotated_from_checkpoint, rotated_from_export

    settings = asdict(postprocess)
    opened = [("torch", weights, rotated_from_checkpoint(weights, "cpu", batch_size, **settings))]
    for name in FORMAT_ORDER[1:]:
        if name in exports:
            opened.append((name, exports[name], rotated_from_export(exports[name], threads=threads,
                                                                    batch_size=batch_size, **settings)))
    for name, path, runner in opened:
        if runner.class_names != list(classes):
            raise VerifyError(f"{path}: its classes ({', '.join(runner.class_names[:5])}) are not the dataset's "
                              f"({', '.join(classes[:5])}); scores would be misread")
    return opened


def score_format(name: str, path: Path, runner, split: RotatedSplit, classes: list[str],
                 latency_images: int) -> RotatedScore:
    from rtmdet.export.rotated import score_runner

    metrics = score_runner(runner, split.records, classes)
    ms = latency_ms(runner, [r.file for r in split.records], latency_images)
    mb = path.stat().st_size / 1e6
    log.info("%-12s mAP %.4f  mAP50 %.4f  mAP75 %.4f  %.2f MB  %.2f ms/img", name, metrics["mAP"],
             metrics["mAP50"], metrics["mAP75"], mb, ms)
    return RotatedScore(name, path, metrics, mb, ms)


def verify_rotated(weights: str | Path, exports: dict[str, Path], dataset: RotatedDataset, *, split: str = "valid",
                   threads: int = 2, latency_images: int = 50, batch_size: int = 8,
                   postprocess: RotatedPostprocessConfig = RotatedPostprocessConfig()) -> list[RotatedScore]:
    """Score the RTMDet-R checkpoint and every export on `split` (CPU, `threads` threads)."""
    import torch

    chosen = rotated_split(dataset, split)
    torch.set_num_threads(threads)
    runners = open_runners(Path(weights), exports, dataset.classes, threads, batch_size, postprocess)
    scores = []
    for name, path, runner in runners:
        scores.append(score_format(name, path, runner, chosen, dataset.classes, latency_images))
        kill_point("verify:format")
    return scores


def report(scores: list[RotatedScore], split: str, threads: int,
           postprocess: RotatedPostprocessConfig) -> dict[str, Any]:
    """verify.json's content: {task, metric, split, threads, postprocess, formats: {name: row}}."""
    torch_map = next((s.metrics["mAP"] for s in scores if s.name == "torch"), None)
    return {"task": TASK, "metric": METRIC, "split": split, "threads": threads, "postprocess": asdict(postprocess),
            "formats": {s.name: s.row(torch_map) for s in scores}}


def format_table(summary: dict[str, Any]) -> str:
    lines = ["| format | mAP50:95 | mAP50 | mAP75 | drop vs torch | size MB | CPU ms/img |", "|---" * 7 + "|"]
    for name, r in summary["formats"].items():
        drop = "" if r["drop"] is None or name == "torch" else f"{r['drop']:+.4f}"
        lines.append(f"| {name} | {r['mAP']:.4f} | {r['mAP50']:.4f} | {r['mAP75']:.4f} | {drop} | "
                     f"{r['size_mb']:.2f} | {r['latency_ms']:.2f} |")
    return "\n".join(lines)


def run_verify_rotated(weights: str | Path, export_dir: str | Path | None, qat_dir: str | Path | None,
                       dataset: RotatedDataset, out: str | Path, *, split: str = "valid", threads: int = 2,
                       latency_images: int = 50, batch_size: int = 8, max_drop: float = 0.02,
                       int8_max_drop: float = 0.05,
                       postprocess: RotatedPostprocessConfig = RotatedPostprocessConfig()) -> dict[str, Any]:
    """Score everything, write `out` (verify.json), then fail if a format's mAP drifted too far."""
    exports = find_exports(export_dir, qat_dir)
    scores = verify_rotated(weights, exports, dataset, split=split, threads=threads, latency_images=latency_images,
                            batch_size=batch_size, postprocess=postprocess)
    summary = report(scores, rotated_split(dataset, split).name, threads, postprocess)
    return publish(summary, out, format_table(summary), max_drop, int8_max_drop)
