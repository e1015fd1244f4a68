"""reports/README.md: one page with the current run's numbers, tables and pictures.

Images are linked relative to the reports folder, so the page renders wherever that folder is
(a checkout, a copy, GitHub). Only metrics/evaluate.json is required; a missing optional input
leaves its section out with a one-line note.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rtmdet.config import as_dict
from rtmdet.reporting.curves import read_live_metrics, training_figure
from rtmdet.reporting.inputs import (EVALUATE_DIR, LIVE_METRICS, PREPARE_DIR, QAT, REPORT_DIR, TEACHER, VERIFY,
                                     format_order, read_optional)  # fmt: skip
from rtmdet.reporting.markdown import figure_png, fmt, image, table

TRAINING_PNG = REPORT_DIR / "training.png"
# What each number of evaluate.json means (pycocotools' summary lines, then the evaluate stage's extras).
MEANING = {
    "mAP": "AP, IoU 0.50:0.95", "mAP50": "AP, IoU 0.50", "mAP75": "AP, IoU 0.75",
    "mAP_small": "AP, small boxes (< 32² px)", "mAP_medium": "AP, medium boxes",
    "mAP_large": "AP, large boxes (> 96² px)", "AR1": "AR, 1 detection per image",
    "AR10": "AR, 10 detections per image", "AR100": "AR, 100 detections per image",
    "AR_small": "AR, small boxes", "AR_medium": "AR, medium boxes", "AR_large": "AR, large boxes",
    "mAP_area": "rotated AP, IoU 0.50:0.95, area under the curve (RTMDet-R; its mAP*: VOC07 11-point)",
    "mAP50_area": "rotated AP, IoU 0.50, area under the curve", "mAP75_area": "rotated AP, IoU 0.75, area",
    "precision_at_conf": "precision at the confusion threshold (IoU 0.50)",
    "recall_at_conf": "recall at the confusion threshold", "f1_at_conf": "F1 at the confusion threshold",
    "images_per_s": "inference speed of the evaluate stage", "num_images": "images scored",
    "top1": "top-1 accuracy (classifier)", "top5": "top-5 accuracy", "precision": "precision, mean over classes",
    "recall": "recall, mean over classes", "f1": "F1, mean over classes",
}  # fmt: skip
EVALUATE_PNGS = (("pr", "Precision-recall curves"), ("pr_mask", "Mask precision-recall curves (segment)"),
                 ("confusion", "Confusion matrix"), ("per_class_ap", "AP per class"),
                 ("worst", "Worst images first (ground truth | predictions)"))  # fmt: skip
PREPARE_PNGS = {"boxes_per_class": "Boxes per class", "box_sizes": "Box sizes",
                "augmented": "Augmented training samples"}  # fmt: skip
# verify.json's numbers per format: key, header, decimals.
FORMAT_COLUMNS = (("mAP", "mAP", 4), ("mAP50", "mAP50", 4), ("drop", "mAP drop vs torch", 4),
                  ("size_mb", "size (MB)", 2), ("latency_ms", "latency (ms / image)", 1))  # fmt: skip
MASK_FORMAT_COLUMNS = (("mask_mAP", "mask mAP", 4), ("mask_drop", "mask mAP drop", 4))  # a segment model's
CLS_FORMAT_COLUMNS = (("top1", "top-1", 4), ("top5", "top-5", 4), ("drop", "top-1 drop vs torch", 4),
                      ("size_mb", "size (MB)", 2), ("latency_ms", "latency (ms / image)", 1))  # a classifier's
DIGITS = {"images_per_s": 1}  # evaluate.json numbers not shown with 4 decimals


def readme_page(reports: Path, evaluate: dict[str, dict[str, Any]], params: dict[str, Any],
                run_name: str | None = None) -> tuple[str, dict[str, bytes]]:  # fmt: skip
    """The markdown of reports/README.md and the PNGs it draws, {path relative to reports: bytes}.
    `params` maps section names (data, model, train) to their dataclasses."""
    reports = Path(reports)
    files: dict[str, bytes] = {}
    lines = _title(evaluate, params, run_name)
    lines += _metrics_section(evaluate)
    lines += _exported_section(reports)
    lines += _qat_section(reports)
    lines += _distillation_section(reports)
    lines += _training_section(reports, files)
    lines += _per_class_section(reports, evaluate)
    rotated = any("mAP_area" in v for v in evaluate.values())  # RTMDet-R draws no confusion matrix or AP bars
    lines += _evaluate_plots_section(reports, list(evaluate), skip=("confusion", "per_class_ap") if rotated else ())
    lines += _prepare_section(reports)
    lines += _params_section(params)
    return "\n".join(lines), files


def _title(evaluate: dict[str, dict[str, Any]], params: dict[str, Any], run_name: str | None) -> list[str]:
    model = params.get("model")
    kind = {"classify": "CSPNeXt classifier", "rotate": "RTMDet-R"}.get(model.task, "RTMDet") if model else "RTMDet"
    what = f"{kind}-{model.size} at {model.imgsz} px" if model else "RTMDet"
    head = [f"# Run report: {what}" + (f", experiment `{run_name}`" if run_name else ""), ""]
    scores = [(f"{split} top-1 {fmt(v.get('top1'))}, top-5 {fmt(v.get('top5'))}" if "top1" in v else
               f"{split} mAP {fmt(v.get('mAP'))}, mAP50 {fmt(v.get('mAP50'))}")
              + (f", mask mAP {fmt(v.get('mask_mAP'))}" if "mask_mAP" in v else "")
              + (f" ({v['num_images']} images)" if v.get("num_images") is not None else "")
              for split, v in evaluate.items()]  # fmt: skip
    return head + ["; ".join(scores) + ". Other runs: [experiments.md](experiments.md).", ""]


def _note(text: str) -> list[str]:
    return [f"_{text}_", ""]


def _metrics_section(evaluate: dict[str, dict[str, Any]]) -> list[str]:
    splits = list(evaluate)
    names = list(dict.fromkeys(k for v in evaluate.values() for k in v if "/" not in k))
    rows = [[f"`{n}`", _meaning(n), *(fmt(evaluate[s].get(n), DIGITS.get(n, 4)) for s in splits)]
            for n in names]  # fmt: skip
    return ["## Metrics", "", "COCO bbox (and for a segment model segm, as mask_*) metrics, a rotated-box model's "
            "DOTA-style rotated mAP, or a classifier's accuracy, of `models/best.pt` (`metrics/evaluate.json`); "
            "a dash is a number left undefined (no boxes of that size, top-5 under 5 classes).", "",
            table(["metric", "meaning", *splits], rows, align="ll" + "r" * len(splits)), ""]  # fmt: skip


def _meaning(name: str) -> str:
    """What a metric means; mask_<name>: the same, of the masks (a segment model's COCO segm)."""
    if name.startswith("mask_") and name[5:] in MEANING:
        return "masks: " + MEANING[name[5:]].replace("boxes", "objects")
    return MEANING.get(name, "")


def _exported_section(reports: Path) -> list[str]:
    data, note = read_optional(reports / VERIFY, "exported-model scores")
    lines = ["## Exported models", ""]
    formats = data.get("formats") if isinstance(data, dict) else None
    if not isinstance(formats, dict) or not formats:
        return lines + _note(note or f"`{reports / VERIFY}` lists no formats.")
    columns, score = FORMAT_COLUMNS, "mAP"
    if any(isinstance(r, dict) and "mask_mAP" in r for r in formats.values()):
        columns = columns[:3] + MASK_FORMAT_COLUMNS + columns[3:]
    if any(isinstance(r, dict) and "top1" in r for r in formats.values()):
        columns, score = CLS_FORMAT_COLUMNS, "top-1"
    rows = [[f"`{name}`", *(fmt(formats[name].get(key), digits) for key, _, digits in columns)]
            for name in format_order([n for n in formats if isinstance(formats[n], dict)])]  # fmt: skip
    split = data.get("split", "valid")
    ops = [f"Operators of `{name}` (what a runtime must implement): "
           + ", ".join(f"{op} x{n}" for op, n in formats[name]["operators"].items()) + "."
           for name in format_order(list(formats)) if name.endswith("int8")
           and isinstance(formats[name], dict) and isinstance(formats[name].get("operators"), dict)]
    return lines + [f"Every format scored on {split} by the same evaluator (`metrics/verify.json`); "
                    f"drop = torch {score} − the format's {score}.", "",
                    table(["format", *(h for _, h, _ in columns)], rows, align="l" + "r" * len(columns)),
                    "", *(line for op_line in ops for line in (op_line, ""))]  # fmt: skip


def _qat_section(reports: Path) -> list[str]:
    data, note = read_optional(reports / QAT, "quantization-aware training scores")
    lines = ["## Quantization-aware training", ""]
    labels = {"float": "float model before QAT", "fake_quant": "after QAT, simulated int8 (fake-quant)"}
    scored = {k: v for k, v in (data or {}).items() if isinstance(v, dict)}
    if not scored:
        return lines + _note(note or f"`{reports / QAT}` holds no scores.")
    labels["int8"] = "the int8 TFLite of the QAT weights"
    if any("top1" in v for v in scored.values()):  # a classifier's
        keys = ["top1"]
    else:
        keys = ["mAP", "mAP50"] + (["mask_mAP", "mask_mAP50"] if any("mask_mAP" in v for v in scored.values()) else [])
    rows = [[labels.get(k, k), *(v.get(key) for key in keys)] for k, v in scored.items()]
    return lines + ["`metrics/qat.json`:", "", table(["model", *keys], rows, align="l" + "r" * len(keys)), ""]


def _distillation_section(reports: Path) -> list[str]:
    """Teacher and student side by side, when the run had a teacher (else nothing)."""
    data, _ = read_optional(reports / TEACHER, "distillation summary")
    if not isinstance(data, dict) or not data.get("teacher"):
        return []
    rows = [["teacher", f"`{data['teacher']}`", fmt(data.get("teacher_mAP")), fmt(data.get("teacher_epochs"), 0),
             fmt(data.get("teacher_train_seconds"), 0)],
            ["student (distilled)", "`models/best.pt`", fmt(data.get("student_mAP")), "",
             fmt(data.get("student_train_seconds"), 0)]]
    return ["## Distillation", "", "Best valid mAP during training (`reports/train/teacher.json`); a teacher "
            "given as a checkpoint was not trained here.", "",
            table(["model", "weights", "valid mAP", "epochs", "training s"], rows, align="llrrr"), ""]


def _training_section(reports: Path, files: dict[str, bytes]) -> list[str]:
    lines = ["## Training curves", ""]
    folder = reports / LIVE_METRICS
    fig = training_figure(read_live_metrics(folder)) if folder.is_dir() else None
    if fig is None:
        return lines + _note(f"No training curves: no dvclive metrics under `{folder}`.")
    files[TRAINING_PNG.as_posix()] = figure_png(fig)
    return lines + [image(TRAINING_PNG.as_posix(), "training curves"), ""]


def _per_class_section(reports: Path, evaluate: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Per class", ""]
    headers = ["class", "GT boxes", "AP", "AP50", "TP", "FP", "FN", "precision", "recall"]
    keys = ["num_gt", "AP", "AP50", "tp", "fp", "fn", "precision", "recall"]
    for split, metrics in evaluate.items():
        rows, note = read_optional(reports / EVALUATE_DIR / f"per_class_{split}.json", f"per-class table for {split}")
        lines += [f"### {split}", ""]
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            lines += ["TP, FP, FN, precision and recall at the confusion threshold (IoU 0.50).", "",
                      table(headers, [[r.get("class"), *(r.get(k) for k in keys)] for r in rows],
                            align="l" + "r" * len(keys)), ""]  # fmt: skip
            continue
        aps = [(k.split("/", 1)[1], v, metrics.get(f"AP50/{k.split('/', 1)[1]}")) for k, v in metrics.items()
               if k.startswith("AP/")]  # fmt: skip
        lines += _note(note or "The per-class table is not a list of rows.")
        if aps:  # evaluate.json still has AP per class
            lines += [table(["class", "AP", "AP50"], aps, align="lrr"), ""]
    return lines


def _evaluate_plots_section(reports: Path, splits: Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    lines = ["## Evaluation plots", ""]
    for split in splits:
        lines += [f"### {split}", ""]
        for key, caption in EVALUATE_PNGS:
            if key in skip:
                continue
            rel = EVALUATE_DIR / f"{key}_{split}.png"
            if (reports / rel).is_file():
                lines += [f"**{caption}**", "", image(rel.as_posix(), f"{caption}, {split}"), ""]
            elif key != "pr_mask":  # only segment models have mask curves
                lines += _note(f"No {caption.lower()}: `{reports / rel}` does not exist.")
    return lines


def _prepare_section(reports: Path) -> list[str]:
    lines = ["## Dataset", ""]
    folder = reports / PREPARE_DIR
    stats, _ = read_optional(folder / "stats.json", "dataset statistics")
    pngs = sorted(folder.glob("*.png"), key=lambda p: (list(PREPARE_PNGS).index(p.stem)
                                                        if p.stem in PREPARE_PNGS else len(PREPARE_PNGS), p.name))
    if not isinstance(stats, dict) and not pngs:
        return lines + _note(f"No dataset charts: nothing in `{folder}` (the prepare stage writes them).")
    splits = stats.get("splits") if isinstance(stats, dict) else None
    if isinstance(splits, dict):
        classes = stats.get("classes") or []
        lines += [f"{len(classes)} classes: {', '.join(map(str, classes))}.", "",
                  table(["split", "images", "boxes", "images without boxes"],
                        [[s, v.get("images"), v.get("boxes"), v.get("images_without_boxes")]
                         for s, v in splits.items() if isinstance(v, dict)], align="lrrr"), ""]  # fmt: skip
    for png in pngs:
        caption = PREPARE_PNGS.get(png.stem, png.stem.replace("_", " "))
        lines += [f"**{caption}**", "", image((PREPARE_DIR / png.name).as_posix(), caption), ""]
    return lines


def _params_section(params: dict[str, Any]) -> list[str]:
    lines = ["## Params", ""]
    for section, values in params.items():
        text = ", ".join(f"{k}={json.dumps(v) if v is None or isinstance(v, (bool, list)) else v}"
                         for k, v in as_dict(values).items())  # fmt: skip
        lines.append(f"* **{section}**: {text}")
    return lines + [""]
