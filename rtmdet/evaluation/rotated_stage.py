"""The evaluate stage for an RTMDet-R (rotated boxes) checkpoint (run_evaluation dispatches here).

Layout under out_dir, the detector's (rtmdet.evaluation.stage) where it applies:
  metrics/evaluate.json            DVC metrics, one object per split: rotated_eval.score_rotated's mAP
                                   (mAP50:95), mAP50, mAP75 and their *_area twins, AP/<class> and
                                   AP50/<class>, precision/recall/F1 at the confusion threshold,
                                   images_per_s and num_images
  evaluate/per_class_<split>.csv   one row per class: class, num_gt, AP, AP50, recall50, tp, fp, fn,
  evaluate/per_class_<split>.json  precision, recall (the last five at the confusion threshold, IoU 0.5)
  evaluate/pr_<split>.json         DVC plot data, rows {class, recall, precision} at rotated IoU 0.5
  evaluate/pr_<split>.png          those curves
  evaluate/worst_<split>.png       the images with the most mistakes first, ground truth | predictions,
                                   rotated boxes drawn as they are; missed objects and false alarms
                                   outlined in white
Images go through the one rotated predictor (letterbox, model, rtmdet.inference.rotated's post-process),
as in training's validation and in the exported files' scoring. Every file is written atomically; the
metrics file last, so its presence means the reports are complete.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from rtmdet.data.dota import RotatedDataset, RotatedRecord, load_dota
from rtmdet.errors import DataError
from rtmdet.evaluation.rotated_eval import evaluate_rotated, truths_of
from rtmdet.evaluation.rotated_map import RotatedDetections, rotated_map
from rtmdet.fileio import write_atomic, write_json_atomic
from rtmdet.geometry.rotated import rotated_iou
from rtmdet.imageio import read_image
from rtmdet.inference.rotated import RotatedPostprocessConfig
from rtmdet.visualize import class_color, draw_rboxes

log = logging.getLogger(__name__)

METRICS_FILE = Path("metrics") / "evaluate.json"
REPORT_DIR = Path("evaluate")
PER_CLASS_COLUMNS = ("class", "num_gt", "AP", "AP50", "recall50", "tp", "fp", "fn", "precision", "recall")
SCORE_THR = 0.001  # scored as the peers are (mmrotate's test_cfg keeps 0.05; lower only adds recall)
TILE = 400
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def evaluate_rotated_checkpoint(
    weights: str | Path, data: str | Path | RotatedDataset, out_dir: str | Path,
    splits: Sequence[str] = ("valid", "test"), device: str = "cpu", score_thr_confusion: float = 0.3,
    grid_images: int = 16, batch_size: int = 8, image_size: int | None = None, require_all: bool = False,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Score an RTMDet-R checkpoint on each split of `splits` the DOTA-layout dataset has and write
    the reports (module docstring); the metrics per split ("valid" also finds a val/ folder)."""
    from rtmdet.models.checkpoint import load_model

    dataset = data if isinstance(data, RotatedDataset) else load_dota(data)
    model, ckpt = load_model(weights, device, tasks=("rotate",))
    classes = list(ckpt["meta"]["dataset_meta"]["classes"])
    if classes != list(dataset.classes):
        raise DataError(f"{weights}: trained on classes {classes}, the dataset has {list(dataset.classes)}")
    imgsz = image_size or int(model.cfg.image_size or 640)
    out_dir = Path(out_dir)
    chosen = {}
    for name in splits:
        split = dataset.validation() if name in ("valid", "val") else dataset.splits.get(name)
        if split is None and require_all:
            raise DataError(f"split {name!r} not in the dataset (it has {', '.join(dataset.splits)})")
        if split is not None:
            chosen[name] = split.records
    if not chosen:
        raise DataError(f"none of the splits {', '.join(splits)} is in the dataset (it has {', '.join(dataset.splits)})")
    metrics: dict[str, dict[str, Any]] = {}
    for name, records in chosen.items():
        ev = evaluate_rotated(model, records, classes, imgsz, device, RotatedPostprocessConfig(score_thr=SCORE_THR),
                              batch_size=batch_size)
        metrics[name] = _write_split(out_dir, name, records, classes, ev, score_thr_confusion, grid_images)
        log.info("%s: mAP50:95 %.4f, mAP50 %.4f on %d images", name, ev["mAP"], ev["mAP50"], len(records))
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    return metrics


def image_errors(det: RotatedDetections, rec: RotatedRecord, score_thr: float,
                 iou_thr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Greedy class-aware matching at score_thr: (gt missed [K] bool, detection a false alarm [N'] bool)
    for the detections over the threshold (difficult boxes never count as missed)."""
    keep = det.scores >= score_thr
    boxes, labels, scores = det.rboxes[keep], det.labels[keep], det.scores[keep]
    missed = ~np.asarray(rec.difficult, bool).copy()
    false = np.ones(len(boxes), bool)
    if len(boxes) and len(rec.labels):
        ious = rotated_iou(torch.as_tensor(boxes, dtype=torch.float64),
                           torch.as_tensor(rec.rboxes, dtype=torch.float64)).numpy()
        taken = np.zeros(len(rec.labels), bool)
        for i in np.argsort(-scores, kind="stable"):
            cand = np.where((labels[i] == rec.labels) & ~taken, ious[i], 0.0)
            g = int(cand.argmax())
            if cand[g] >= iou_thr:
                taken[g], false[i] = True, False
        missed &= ~taken
    return missed, false


def _write_split(out_dir: Path, split: str, records: Sequence[RotatedRecord], classes: Sequence[str],
                 ev: dict[str, Any], score_thr: float, grid_images: int) -> dict[str, Any]:
    detections = ev["detections"]
    errors = [image_errors(d, r, score_thr) for d, r in zip(detections, records)]
    rows = []
    for c, (name, row) in enumerate(zip(classes, ev["per_class"])):
        tp = fp = fn = 0
        for d, r, (missed, false) in zip(detections, records, errors):
            kept = d.labels[d.scores >= score_thr] == c
            fp += int((false & kept).sum())
            tp += int((~false & kept).sum())
            fn += int((missed & (r.labels == c)).sum())
        rows.append({"class": name, "num_gt": row["num_gts"], "AP": row["ap"], "AP50": row["ap50"],
                     "recall50": row["recall50"], "tp": tp, "fp": fp, "fn": fn,
                     "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None})
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    precision, recall = (tp / (tp + fp) if tp + fp else None), (tp / (tp + fn) if tp + fn else None)
    metrics = {k: ev[k] for k in ("mAP", "mAP50", "mAP75", "mAP_area", "mAP50_area", "mAP75_area")}
    metrics.update({f"AP/{r['class']}": r["AP"] for r in rows})
    metrics.update({f"AP50/{r['class']}": r["AP50"] for r in rows})
    metrics.update(precision_at_conf=precision, recall_at_conf=recall,
                   f1_at_conf=2 * precision * recall / (precision + recall) if precision and recall else None,
                   images_per_s=len(records) / max(ev["seconds"], 1e-9), num_images=len(records))
    folder = out_dir / REPORT_DIR
    write_atomic(folder / f"per_class_{split}.csv", _csv(rows).encode())
    write_json_atomic(folder / f"per_class_{split}.json", rows)
    curves = rotated_map(detections, truths_of(records), len(classes), 0.5)["per_class"]
    pr = [{"class": name, "recall": float(r), "precision": float(p)}
          for name, row in zip(classes, curves) for r, p in zip(*row["curve"])]
    write_json_atomic(folder / f"pr_{split}.json", pr)
    write_atomic(folder / f"pr_{split}.png", _pr_png(classes, curves, split))
    order = sorted(range(len(records)), key=lambda i: -(int(errors[i][0].sum()) + int(errors[i][1].sum())))
    grid = worst_grid([records[i] for i in order[:grid_images]], [detections[i] for i in order[:grid_images]],
                      [errors[i] for i in order[:grid_images]], classes, score_thr)
    ok, png = cv2.imencode(".png", grid)
    write_atomic(folder / f"worst_{split}.png", png.tobytes())
    return metrics


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PER_CLASS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def _pr_png(classes: Sequence[str], curves: list[dict[str, Any]], split: str) -> bytes:
    from rtmdet.evaluation.plots import figure_png
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    for c, (name, row) in enumerate(zip(classes, curves)):
        recall, precision = row["curve"]
        if len(recall):
            b, g, r = class_color(c)
            ax.plot(recall, precision, color=(r / 255, g / 255, b / 255), label=f"{name} AP50 {row['ap']:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall at rotated IoU 0.5 ({split})")
    if any(len(row["curve"][0]) for row in curves):
        ax.legend(loc="lower left", fontsize=8)
    return figure_png(fig)


def worst_grid(records: Sequence[RotatedRecord], detections: Sequence[RotatedDetections],
               errors: Sequence[tuple[np.ndarray, np.ndarray]], classes: Sequence[str], score_thr: float) -> np.ndarray:
    """One row per image: a caption, then ground truth | predictions >= score_thr."""
    rows = []
    for rec, det, (missed, false) in zip(records, detections, errors):
        image = read_image(rec.file)
        scale = TILE / max(image.shape[:2])
        small = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        keep = det.scores >= score_thr
        left = draw_rboxes(small, rec.rboxes, rec.labels, missed, scale)
        right = draw_rboxes(small, det.rboxes[keep], det.labels[keep], false, scale)
        row = np.full((30 + TILE, 2 * TILE + 8, 3), 255, np.uint8)
        row[30:30 + small.shape[0], :small.shape[1]] = left
        row[30:30 + small.shape[0], TILE + 8:TILE + 8 + small.shape[1]] = right
        text = (f"{rec.file.name[:40]}: {int(missed.sum())} missed, {int(false.sum())} false alarms; "
                f"ground truth | predictions >= {score_thr:g}")
        cv2.putText(row, text, (4, 20), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(row)
    if not rows:
        rows.append(np.full((40, 2 * TILE + 8, 3), 255, np.uint8))
        cv2.putText(rows[0], "no images to show", (4, 25), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    legend = np.full((28, 2 * TILE + 8, 3), 255, np.uint8)
    x = 4
    for c, name in enumerate(classes[:12]):
        cv2.rectangle(legend, (x, 8), (x + 14, 22), class_color(c), -1)
        cv2.putText(legend, name[:16], (x + 18, 20), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 30 + 9 * len(name[:16])
    return np.vstack([legend, *rows])
