"""The evaluate stage: score a checkpoint on `valid` (and `test` when present) and write reports.

Layout under out_dir (the pipeline points it at reports/):
  metrics/evaluate.json            DVC metrics, one object per split: {"valid": {...}, "test": {...}};
                                   each holds EvalResult.to_metrics() (mAP, mAP50, ..., AP/<class>,
                                   AP50/<class>, images_per_s, num_images) plus precision_at_conf,
                                   recall_at_conf, f1_at_conf at the confusion threshold
  evaluate/results_<split>.json    COCO results (original category ids), what was scored
  evaluate/per_class_<split>.csv   one row per class: class, category_id, num_gt, absent, AP, AP50,
  evaluate/per_class_<split>.json  and tp, fp, fn, precision, recall at the confusion threshold
  evaluate/pr_<split>.json         DVC plot data, rows {class, recall, precision} at IoU 0.50 (the
                                   mean over classes as class "all classes")
  evaluate/pr_<split>.png, confusion_<split>.png, per_class_ap_<split>.png, worst_<split>.png
  a segment model's: mask_* metrics, mask_AP/mask_AP50 columns, pr_mask_<split>.json/.png, and
  masks tinted in the worst-images grid
A classifier checkpoint (meta task "classify") is scored on a class-folder dataset by
rtmdet.evaluation.classify_stage instead, an RTMDet-R checkpoint (task "rotate") on a DOTA-layout
dataset by rtmdet.evaluation.rotated_stage: the same metrics file and folder, their own reports.
Every file is written to a temporary name in its folder and renamed, so a killed stage never
leaves a half-written file. JSON never holds NaN: undefined numbers are null.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rtmdet.data.class_folders import ClassificationDataset
from rtmdet.data.records import DetectionDataset, DetectionSplit
from rtmdet.errors import DataError
from rtmdet.evaluation.classification import ClassificationResult
from rtmdet.fileio import json_safe, write_atomic, write_json_atomic  # noqa: F401 (re-exported)
from rtmdet.evaluation.coco_eval import EvalResult, evaluate_detector
from rtmdet.evaluation.confusion import ConfusionMatrix, confusion_matrix, image_errors, rank_worst
from rtmdet.inference.detections import Detections
from rtmdet.visualize import class_color

log = logging.getLogger(__name__)

METRICS_FILE = Path("metrics") / "evaluate.json"
REPORT_DIR = Path("evaluate")
MEAN_CLASS = "all classes"  # the class name of the mean curve in pr_<split>.json
PER_CLASS_COLUMNS = ("class", "category_id", "num_gt", "absent", "AP", "AP50",
                     "tp", "fp", "fn", "precision", "recall")  # fmt: skip


def run_evaluation(
    weights: str | Path, data: str | Path | DetectionDataset | ClassificationDataset, out_dir: str | Path,
    splits: Sequence[str] = ("valid", "test"), device: str = "cpu", score_thr_confusion: float = 0.3,
    grid_images: int = 16, batch_size: int = 8, image_size: int | None = None,
    iou_thr_confusion: float = 0.5, require_all: bool = False, progress: bool = True,
) -> dict[str, EvalResult] | dict[str, ClassificationResult]:  # fmt: skip
    """Score checkpoint `weights` on each split of `splits` the dataset has and write the reports
    (see the module docstring). Missing splits are skipped unless require_all. A classifier
    checkpoint goes to classify_stage.evaluate_classifier (the thresholds do not apply to it)."""
    from rtmdet.data.coco import load_dataset
    from rtmdet.inference.predictor import Detector
    from rtmdet.models.checkpoint import checkpoint_task, is_classifier_checkpoint, read_checkpoint

    if checkpoint_task(weights) == "rotate":
        from rtmdet.evaluation.rotated_stage import evaluate_rotated_checkpoint

        return evaluate_rotated_checkpoint(weights, data, out_dir, splits, device=device,
                                           score_thr_confusion=score_thr_confusion, grid_images=grid_images,
                                           batch_size=batch_size, image_size=image_size, require_all=require_all)
    if is_classifier_checkpoint(read_checkpoint(weights)):
        from rtmdet.evaluation.classify_stage import evaluate_classifier

        return evaluate_classifier(weights, data, out_dir, splits, device=device, grid_images=grid_images,
                                   batch_size=batch_size, image_size=image_size, require_all=require_all,
                                   progress=progress)  # fmt: skip
    detector = Detector.from_checkpoint(weights, device=device, image_size=image_size, batch_size=batch_size)
    # A segment model (the checkpoint says) is scored by its masks too: the data with its masks.
    masks = detector.task == "segment"
    dataset = data if isinstance(data, DetectionDataset) else load_dataset(data, masks=masks)
    chosen = select_splits(dataset, splits, require_all)
    return evaluate_splits(detector, dataset, out_dir, chosen, score_thr_confusion=score_thr_confusion,
                           iou_thr_confusion=iou_thr_confusion, grid_images=grid_images,
                           batch_size=batch_size, progress=progress)  # fmt: skip


def select_splits(dataset: DetectionDataset, splits: Sequence[str], require_all: bool = False) -> list[str]:
    """The requested splits the dataset has; DataError when one is missing (require_all) or none is."""
    chosen = [s for s in splits if s in dataset.splits]
    missing = [s for s in splits if s not in dataset.splits]
    have = ", ".join(dataset.splits)
    if missing and (require_all or not chosen):
        raise DataError(f"dataset has no {' or '.join(missing)} split (it has: {have})")
    for name in missing:
        log.info("no %s split in the dataset; not evaluated", name)
    return chosen


def evaluate_splits(
    detector: Callable[[list[Path]], list[Detections]], dataset: DetectionDataset,
    out_dir: str | Path, splits: Sequence[str], score_thr_confusion: float = 0.3,
    iou_thr_confusion: float = 0.5, grid_images: int = 16, batch_size: int = 8, progress: bool = True,
) -> dict[str, EvalResult]:  # fmt: skip
    """Run any detector (torch, ONNX, TFLite) over the splits; write reports, then the metrics file
    last, so a metrics file on disk means every report beside it is complete."""
    out_dir = Path(out_dir)
    results: dict[str, EvalResult] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name in splits:
        split = dataset.splits[name]
        result = evaluate_detector(detector, split, dataset, batch_size=batch_size, progress=progress)
        extra = write_split_reports(result, split, out_dir, score_thr_confusion, iou_thr_confusion,
                                    grid_images)  # fmt: skip
        results[name] = result
        metrics[name] = {**result.to_metrics(), **extra}
        masks = "" if result.masks is None else (f"; masks: mAP {_fmt(result.masks.stats['mAP'])}, "
                                                 f"mAP50 {_fmt(result.masks.stats['mAP50'])}")
        log.info("%s: mAP %s, mAP50 %s%s over %d images", name, _fmt(result.stats["mAP"]),
                 _fmt(result.stats["mAP50"]), masks, result.num_images)  # fmt: skip
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    log.info("wrote %s and reports in %s", out_dir / METRICS_FILE, out_dir / REPORT_DIR)
    return results


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_split_reports(
    result: EvalResult, split: DetectionSplit, out_dir: Path, score_thr: float = 0.3,
    iou_thr: float = 0.5, grid_images: int = 16,
) -> dict[str, float | None]:  # fmt: skip
    """Write one split's results, tables, PR data and PNGs; return its metrics at the threshold."""
    from rtmdet.evaluation import plots

    folder = Path(out_dir) / REPORT_DIR
    name = split.name
    dets = result.detections or {}
    cm = confusion_matrix(split.records, dets, result.classes, score_thr, iou_thr)
    write_json_atomic(folder / f"results_{name}.json", result.results, indent=None)
    rows = per_class_rows(result, cm)
    write_json_atomic(folder / f"per_class_{name}.json", rows)
    write_atomic(folder / f"per_class_{name}.csv", _csv(rows))
    write_json_atomic(folder / f"pr_{name}.json", pr_rows(result))
    title = f"{name} split ({result.num_images} images)"
    figures = {
        "pr": plots.pr_curves_figure(result, f"Precision-recall per class, {title}"),
        "confusion": plots.confusion_figure(
            cm, f"Confusion matrix, {title}, score >= {score_thr:g}, IoU >= {iou_thr:g}"),
        "per_class_ap": plots.per_class_ap_figure(result, f"AP per class, {title}"),
    }  # fmt: skip
    if result.masks is not None:  # the segment task: the masks' curves beside the boxes'
        write_json_atomic(folder / f"pr_mask_{name}.json", pr_rows(result.masks))
        figures["pr_mask"] = plots.pr_curves_figure(result.masks, f"Mask precision-recall per class, {title}")
    for key, fig in figures.items():
        write_atomic(folder / f"{key}_{name}.png", plots.figure_png(fig))
    ranked = rank_worst(image_errors(split.records, dets, score_thr, iou_thr))
    grid = plots.worst_images_grid(split.records, dets, ranked, result.classes, score_thr,
                                   num_images=grid_images, iou_thr=iou_thr)  # fmt: skip
    class_colors = [class_color(i) for i in range(len(result.classes))]
    write_atomic(folder / f"worst_{name}.png", plots.image_png(grid, keep_colors=class_colors))
    totals = cm.totals()
    return {"precision_at_conf": totals["precision"], "recall_at_conf": totals["recall"],
            "f1_at_conf": totals["f1"]}  # fmt: skip


def per_class_rows(result: EvalResult, cm: ConfusionMatrix) -> list[dict[str, Any]]:
    """The per-class table: COCO AP / AP50 and the confusion counts at the score threshold."""
    rows = []
    mask_rows = result.masks.per_class if result.masks is not None else [None] * len(result.per_class)
    for row, counts, mask in zip(result.per_class, cm.per_class(), mask_rows, strict=True):
        rows.append({
            "class": row["name"], "category_id": row["category_id"], "num_gt": row["num_gt"],
            "absent": row["absent"], "AP": row["AP"], "AP50": row["AP50"],
            **{k: counts[k] for k in ("tp", "fp", "fn", "precision", "recall")},
        })  # fmt: skip
        if mask is not None:  # the segment task: mask AP beside the box AP
            rows[-1].update(mask_AP=mask["AP"], mask_AP50=mask["AP50"])
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    """CSV text; None becomes an empty cell, floats keep 6 decimals."""
    buf = io.StringIO()
    columns = PER_CLASS_COLUMNS + tuple(k for k in ("mask_AP", "mask_AP50") if rows and k in rows[0])
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else round(v, 6) if isinstance(v, float) else v
                         for k, v in row.items()})  # fmt: skip
    return buf.getvalue()


def pr_rows(result: EvalResult, iou: float = 0.5) -> list[dict[str, Any]]:
    """DVC plot rows {class, recall, precision} per class with ground truth, then their mean."""
    rows, curves = [], []
    for label, name in enumerate(result.classes):
        pr = result.pr_curve(label, iou=iou)
        if pr is None:
            continue
        curves.append(pr[1])
        rows += [{"class": name, "recall": round(float(r), 4), "precision": round(float(p), 4)}
                 for r, p in zip(*pr, strict=True)]  # fmt: skip
    if curves:
        mean = np.mean(curves, axis=0)
        rows += [{"class": MEAN_CLASS, "recall": round(float(r), 4), "precision": round(float(p), 4)}
                 for r, p in zip(result.rec_thrs, mean, strict=True)]  # fmt: skip
    return rows
