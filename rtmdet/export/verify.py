"""The `verify` stage's logic: every model format scored on one split by the same evaluator.

The torch checkpoint and each exported file (ONNX, TFLite fp32 / fp16 / int8, QAT int8) run
through the same `Detector` pre- and post-process and the same pycocotools evaluation, on the
CPU with a fixed thread count. For each format verify.json holds mAP, mAP50, `drop` (torch mAP
minus the format's mAP), the file size and the median latency of one image through the model
(backend call only: the letterboxed tensor in, raw head outputs back; reading, letterbox and NMS
are the same code for every format and are left out).

A format whose drop exceeds its limit (`max_drop`, or `int8_max_drop` for the int8 files) fails
the stage with one line per offending format, after verify.json has been written so the numbers
can be read.

A classifier checkpoint goes the same way by top-1 instead of mAP (rtmdet.export.verify_classify),
an RTMDet-R by rotated mAP (rtmdet.export.verify_rotated), chosen in run_verify by the checkpoint's task.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtmdet.data.class_folders import ClassificationDataset
from rtmdet.data.dota import RotatedDataset
from rtmdet.data.records import DetectionDataset
from rtmdet.errors import RTMDetError
from rtmdet.failpoints import kill_point
from rtmdet.fileio import write_json_atomic

log = logging.getLogger(__name__)

# Report order; the file of each format inside the export / qat folders (see stages/export.py).
FORMAT_ORDER = ("torch", "onnx", "tflite_fp32", "tflite_fp16", "tflite_int8", "qat_int8")
_PATTERNS = {"onnx": "*.onnx", "tflite_fp32": "*_fp32.tflite", "tflite_fp16": "*_fp16.tflite",
             "tflite_int8": "*_int8*.tflite"}


class VerifyError(RTMDetError):
    """An exported model whose accuracy drifted beyond the allowed drop."""


@dataclass
class FormatScore:
    """One format's result on the split."""

    name: str
    path: Path
    metrics: dict[str, Any]
    size_mb: float
    latency_ms: float

    def row(self, torch_map: float | None, torch_mask_map: float | None = None) -> dict[str, Any]:
        m = self.metrics
        drop = None if torch_map is None else round(torch_map - m["mAP"], 5)
        row = {"mAP": m["mAP"], "mAP50": m["mAP50"], "mAP_small": m.get("mAP_small"), "drop": drop,
               "size_mb": round(self.size_mb, 3), "latency_ms": round(self.latency_ms, 2),
               "file": str(self.path)}
        if "mask_mAP" in m:  # a segment model: its masks' numbers and drop too
            row.update(mask_mAP=m["mask_mAP"], mask_mAP50=m["mask_mAP50"],
                       mask_drop=None if torch_mask_map is None else round(torch_mask_map - m["mask_mAP"], 5))
        if self.path.suffix == ".tflite":  # what a runtime must implement to run the file
            from rtmdet.export.backends import tflite_operators

            row["operators"] = tflite_operators(self.path)
        return row


def find_exports(export_dir: str | Path | None, qat_dir: str | Path | None = None) -> dict[str, Path]:
    """{format: file} of the exported models present in the export and qat folders."""
    found: dict[str, Path] = {}
    if export_dir is not None and Path(export_dir).is_dir():
        for name, pattern in _PATTERNS.items():
            files = sorted(Path(export_dir).glob(pattern))
            if len(files) > 1:
                raise VerifyError(f"{export_dir}: several {name} files ({', '.join(f.name for f in files)}); "
                                  "keep one per format")
            if files:
                found[name] = files[0]
    if qat_dir is not None and Path(qat_dir).is_dir():
        files = sorted(Path(qat_dir).glob("*.tflite"))
        if files:
            found["qat_int8"] = files[0]
    return found


def latency_ms(detector, files: list[Path], count: int) -> float:
    """Median milliseconds of one image through the detector's backend (after 3 warm-up runs)."""
    from rtmdet.imageio import read_image
    from rtmdet.inference.preprocess import letterbox, to_chw_tensor

    tensors = [to_chw_tensor([letterbox(read_image(f), detector.image_size)[0]]) for f in files[:max(count, 1)]]
    for t in tensors[:3]:
        detector.backend(t)
    times = []
    for t in tensors:
        start = time.perf_counter()
        detector.backend(t)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def score_format(name: str, path: Path, detector, dataset: DetectionDataset, split: str, latency_images: int,
                 batch_size: int) -> FormatScore:
    from rtmdet.evaluation.coco_eval import evaluate_detector

    result = evaluate_detector(detector, dataset.splits[split], dataset, batch_size=batch_size, progress=False)
    files = [r.file for r in dataset.splits[split].records]
    ms = latency_ms(detector, files, latency_images)
    metrics = result.to_metrics()
    masks = f"  mask mAP {metrics['mask_mAP']:.4f}" if "mask_mAP" in metrics else ""
    log.info("%-12s mAP %.4f  mAP50 %.4f%s  %.2f MB  %.2f ms/img", name, metrics["mAP"], metrics["mAP50"], masks,
             path.stat().st_size / 1e6, ms)
    return FormatScore(name, path, metrics, path.stat().st_size / 1e6, ms)


def open_detectors(weights: Path, exports: dict[str, Path], classes: list[str], threads: int,
                   batch_size: int) -> list[tuple[str, Path, Any]]:
    """(format, file, Detector) of the checkpoint and every export, all opened before any is
    scored: a damaged file or a sidecar that does not match its model fails the stage at once,
    in one line, instead of after minutes of scoring the others."""
    from rtmdet.export.backends import detector_from_export
    from rtmdet.inference.predictor import Detector

    opened = [("torch", weights, Detector.from_checkpoint(weights, device="cpu", batch_size=batch_size))]
    for name in FORMAT_ORDER[1:]:
        if name in exports:
            opened.append((name, exports[name], detector_from_export(exports[name], class_names=classes,
                                                                     threads=threads, batch_size=batch_size)))
    return opened


def verify(weights: str | Path, exports: dict[str, Path], dataset: DetectionDataset, *, split: str = "valid",
           threads: int = 2, latency_images: int = 50, batch_size: int = 8) -> list[FormatScore]:
    """Score the torch checkpoint and every export on `split` (CPU, `threads` threads)."""
    import torch

    if split not in dataset.splits:
        raise VerifyError(f"split {split!r} not in the dataset (splits: {', '.join(dataset.splits)})")
    torch.set_num_threads(threads)
    detectors = open_detectors(Path(weights), exports, dataset.classes, threads, batch_size)
    scores = []
    for name, path, detector in detectors:
        scores.append(score_format(name, path, detector, dataset, split, latency_images, batch_size))
        kill_point("verify:format")
    return scores


def report(scores: list[FormatScore], split: str, threads: int) -> dict[str, Any]:
    """verify.json's content: {split, threads, formats: {name: row}}."""
    torch_map = next((s.metrics["mAP"] for s in scores if s.name == "torch"), None)
    torch_mask_map = next((s.metrics.get("mask_mAP") for s in scores if s.name == "torch"), None)
    return {"split": split, "threads": threads,
            "formats": {s.name: s.row(torch_map, torch_mask_map) for s in scores}}


def publish(summary: dict[str, Any], out: str | Path, table: str, max_drop: float, int8_max_drop: float
            ) -> dict[str, Any]:
    """Every task's verify ending: write `out` (verify.json), print the console table, then fail
    in one line if a format's metric drifted too far (check_drops)."""
    write_json_atomic(Path(out), summary)
    print(table, flush=True)
    problems = check_drops(summary, max_drop, int8_max_drop)
    if problems:
        raise VerifyError("; ".join(problems))
    return summary


def check_drops(summary: dict[str, Any], max_drop: float, int8_max_drop: float) -> list[str]:
    """One line per format whose mAP fell further below torch than allowed."""
    problems = []
    for name, row in summary["formats"].items():
        limit = int8_max_drop if "int8" in name else max_drop
        for what, key, drop in (("mAP", "mAP", row["drop"]), ("mask mAP", "mask_mAP", row.get("mask_drop"))):
            if drop is not None and name != "torch" and drop > limit:
                problems.append(f"{name} ({row['file']}): {what} {row[key]:.4f} is {drop:.4f} below torch, more "
                                f"than the allowed {limit} (verify.{'int8_' if 'int8' in name else ''}max_drop)")
    return problems


def format_table(summary: dict[str, Any]) -> str:
    masks = any("mask_mAP" in r for r in summary["formats"].values())
    head = "| format | mAP | mAP50 | drop vs torch |" + (" mask mAP | mask mAP50 | mask drop |" if masks else "")
    lines = [head + " size MB | CPU ms/img |", "|---" * (6 + 3 * masks) + "|"]
    for name, r in summary["formats"].items():
        drop = "" if r["drop"] is None or name == "torch" else f"{r['drop']:+.4f}"
        cells = f"| {name} | {r['mAP']:.4f} | {r['mAP50']:.4f} | {drop} |"
        if masks:
            mdrop = "" if r.get("mask_drop") is None or name == "torch" else f"{r['mask_drop']:+.4f}"
            cells += f" {r['mask_mAP']:.4f} | {r['mask_mAP50']:.4f} | {mdrop} |"
        lines.append(cells + f" {r['size_mb']:.2f} | {r['latency_ms']:.2f} |")
    return "\n".join(lines)


def _task(weights: Path, dataset) -> str:
    """The checkpoint's task (the one dispatch point: classify, rotate, or the detector path for
    detect and segment); one line when the dataset is of another kind."""
    from rtmdet.models.checkpoint import CLASSIFY, config_from_checkpoint, is_classifier_checkpoint, read_checkpoint

    ckpt = read_checkpoint(weights)
    task = CLASSIFY if is_classifier_checkpoint(ckpt) else config_from_checkpoint(ckpt, weights).task
    kinds = {CLASSIFY: ("a classifier", ClassificationDataset), "rotate": ("an RTMDet-R (rotate)", RotatedDataset)}
    model, wanted = kinds.get(task, ("a detector", DetectionDataset))
    if not isinstance(dataset, wanted):
        data = next((words for kind, words in ((ClassificationDataset, "class folders"),
                                               (RotatedDataset, "a DOTA-layout rotated-box dataset"),
                                               (DetectionDataset, "a detection dataset"))
                     if isinstance(dataset, kind)), type(dataset).__name__)
        raise VerifyError(f"{weights}: {model} checkpoint, but the dataset given is {data}")
    return task


def run_verify(weights: str | Path, export_dir: str | Path | None, qat_dir: str | Path | None,
               dataset: DetectionDataset | ClassificationDataset | RotatedDataset, out: str | Path, *,
               split: str = "valid", threads: int = 2, latency_images: int = 50, batch_size: int = 8,
               max_drop: float = 0.02, int8_max_drop: float = 0.05) -> dict[str, Any]:
    """Score everything, write `out` (verify.json), then fail if a format drifted too far. A
    classifier checkpoint is verified by top-1 on a class-folder dataset (verify_classify), an
    RTMDet-R by rotated mAP on a DOTA-layout one (verify_rotated)."""
    task = _task(Path(weights), dataset)
    if task in ("classify", "rotate"):
        from rtmdet.export.verify_classify import run_verify_classifier
        from rtmdet.export.verify_rotated import run_verify_rotated

        run_task = run_verify_classifier if task == "classify" else run_verify_rotated
        return run_task(weights, export_dir, qat_dir, dataset, out, split=split, threads=threads,
                        latency_images=latency_images, batch_size=batch_size, max_drop=max_drop,
                        int8_max_drop=int8_max_drop)
    exports = find_exports(export_dir, qat_dir)
    scores = verify(weights, exports, dataset, split=split, threads=threads, latency_images=latency_images,
                    batch_size=batch_size)
    summary = report(scores, split, threads)
    return publish(summary, out, format_table(summary), max_drop, int8_max_drop)
