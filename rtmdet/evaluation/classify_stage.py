"""The evaluate stage for a CSPNeXt classifier checkpoint (run_evaluation dispatches here).

Layout under out_dir, the detector's (rtmdet.evaluation.stage) where it applies:
  metrics/evaluate.json            DVC metrics, one object per split, keyed by the split name the caller
                                   asked for ("valid" for the class folder val/, so a classifier's and a
                                   detector's metrics line up in `dvc metrics diff`); each holds
                                   ClassificationResult.metrics() (top1, top5, precision, recall, f1,
                                   recall/<class>) plus images_per_s and num_images
  evaluate/per_class_<split>.csv   one row per class: class, support, precision, recall, f1
  evaluate/per_class_<split>.json
  evaluate/confusion_<split>.png   row-normalized confusion matrix
  evaluate/worst_<split>.png       the most confidently wrong images first, each captioned
                                   "true X / pred Y 0.93" (the predicted class's softmax); always written,
                                   so the stage's outputs do not depend on the scores: with no wrong image
                                   it holds the note "no wrong images" and no tiles
Images go through the one classifier pre-process (rtmdet.data.class_transforms.eval_transform, via
rtmdet.export.classify.load_images), as in training's validation and in the exported files' scoring.
Every file is written atomically; the metrics file last, so its presence means the reports are complete.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from rtmdet.data.class_folders import SPLIT_FOLDERS, ClassificationDataset, ClassImage, load_class_folders
from rtmdet.errors import DataError
from rtmdet.evaluation.classification import ClassificationResult, classification_result, worst_images
from rtmdet.fileio import write_atomic, write_json_atomic

log = logging.getLogger(__name__)

METRICS_FILE = Path("metrics") / "evaluate.json"
REPORT_DIR = Path("evaluate")
PER_CLASS_COLUMNS = ("class", "support", "precision", "recall", "f1")
TILE = 192  # pixels: the longer side of each image in the worst-images grid
COLS = 4
_CAPTION_H = 22


def evaluate_classifier(
    weights: str | Path, data: str | Path | ClassificationDataset, out_dir: str | Path,
    splits: Sequence[str] = ("valid", "test"), device: str = "cpu", grid_images: int = 16,
    batch_size: int = 8, image_size: int | None = None, require_all: bool = False, progress: bool = True,
) -> dict[str, ClassificationResult]:  # fmt: skip
    """Score classifier checkpoint `weights` on each split of `splits` the class-folder dataset has
    and write the reports (see the module docstring); results keyed by the requested split names."""
    from rtmdet.models.checkpoint import class_names_of, load_classifier

    dataset = _class_dataset(data)
    chosen = select_class_splits(dataset, splits, require_all)
    model, ckpt = load_classifier(weights, device)
    classes = class_names_of(ckpt, model.cfg.num_classes)
    if classes != dataset.classes:
        raise DataError(f"{weights}: its classes ({', '.join(classes[:5])}) are not those of {dataset.root} "
                        f"({', '.join(dataset.classes[:5])}); scores would be misread")
    size = image_size or model.cfg.image_size
    out_dir = Path(out_dir)
    results: dict[str, ClassificationResult] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for asked, name in chosen.items():
        images = dataset.splits[name].images
        if not images:
            raise DataError(f"{dataset.splits[name].folder}: the {name} split has no images to evaluate")
        logits, seconds = split_logits(model, images, size, batch_size, device, progress, f"evaluate {asked}")
        labels = np.array([im.label for im in images], np.int64)
        result = classification_result(logits, labels, dataset.classes)
        write_split_reports(result, logits, images, out_dir, asked, grid_images)
        results[asked] = result
        metrics[asked] = {**result.metrics(), "images_per_s": len(images) / seconds if seconds > 0 else None,
                          "num_images": len(images)}
        log.info("%s: top-1 %.4f over %d images", asked, result.top1, len(images))
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    log.info("wrote %s and reports in %s", out_dir / METRICS_FILE, out_dir / REPORT_DIR)
    return results


def _class_dataset(data: str | Path | ClassificationDataset) -> ClassificationDataset:
    if isinstance(data, ClassificationDataset):
        return data
    if isinstance(data, (str, Path)):
        return load_class_folders(data, check_images=False)
    raise DataError(f"a classifier checkpoint is evaluated on a class-folder dataset (root/<split>/<class>/), "
                    f"got a {type(data).__name__}")


def select_class_splits(dataset: ClassificationDataset, splits: Sequence[str],
                        require_all: bool = False) -> dict[str, str]:
    """Requested split name -> the dataset's split ("valid" and "validation" mean val); DataError
    when one is missing (require_all) or none is."""
    alias = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}
    chosen: dict[str, str] = {}
    missing = []
    for asked in splits:
        name = alias.get(asked, asked)
        if name not in dataset.splits:
            missing.append(asked)
        elif name not in chosen.values():  # "val" and "valid" both asked: scored once, under the first
            chosen[asked] = name
    if missing and (require_all or not chosen):
        raise DataError(f"{dataset.root}: no {' or '.join(missing)} split (it has: {', '.join(dataset.splits)})")
    for asked in missing:
        log.info("no %s split in %s; not evaluated", asked, dataset.root)
    return chosen


@torch.inference_mode()
def split_logits(model: torch.nn.Module, images: Sequence[ClassImage], size: int, batch_size: int = 8,
                 device: str = "cpu", progress: bool = True, desc: str = "evaluate") -> tuple[np.ndarray, float]:
    """Logits [N, C] (float32) of the images, eval_transform'ed, in batches on the device; and the
    seconds of the whole loop (reading, pre-process, model), as the detector's images_per_s counts."""
    from rtmdet.export.classify import load_images

    model.eval()
    parts = []
    start = time.perf_counter()
    with tqdm(total=len(images), unit="img", desc=desc, disable=not progress) as bar:
        for i in range(0, len(images), batch_size):
            batch = load_images([im.file for im in images[i : i + batch_size]], size)
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
            parts.append(model(model.normalize(x)).float().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(parts), time.perf_counter() - start


def write_split_reports(result: ClassificationResult, logits: np.ndarray, images: Sequence[ClassImage],
                        out_dir: Path, name: str, grid_images: int = 16) -> None:
    """One split's per-class table (CSV, JSON), confusion figure and worst-images grid."""
    from rtmdet.evaluation.classification import confusion_figure
    from rtmdet.evaluation.plots import figure_png, image_png

    folder = Path(out_dir) / REPORT_DIR
    rows = per_class_rows(result)
    write_json_atomic(folder / f"per_class_{name}.json", rows)
    write_atomic(folder / f"per_class_{name}.csv", _csv(rows))
    title = f"Confusion matrix, {name} split ({len(images)} images), top-1 {result.top1:.3f}"
    write_atomic(folder / f"confusion_{name}.png", figure_png(confusion_figure(result, title)))
    labels = np.array([im.label for im in images])
    worst = worst_images(logits, labels, grid_images)
    grid = worst_grid(images, logits, result.classes, worst, int((logits.argmax(1) != labels).sum()), name)
    write_atomic(folder / f"worst_{name}.png", image_png(grid))


def per_class_rows(result: ClassificationResult) -> list[dict[str, Any]]:
    """The per-class table: class, support, precision, recall, f1."""
    return [{"class": r["name"], "support": r["support"], "precision": r["precision"], "recall": r["recall"],
             "f1": r["f1"]} for r in result.per_class]


def _csv(rows: list[dict[str, Any]]) -> str:
    """CSV text, floats with 6 decimals."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PER_CLASS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def worst_grid(images: Sequence[ClassImage], logits: np.ndarray, classes: Sequence[str], order: Sequence[int],
               num_wrong: int, split: str, tile: int = TILE, cols: int = COLS) -> np.ndarray:
    """A BGR image: a note, then one tile per index of `order` (worst first): the image under the
    caption "true X / pred Y 0.93" and its rank and file name."""
    from rtmdet.evaluation.plots import _GAP, _text_strip

    prob = _softmax(logits)
    tiles = [_tile(rank + 1, images[i], classes, int(prob[i].argmax()), float(prob[i].max()), tile)
             for rank, i in enumerate(order)]
    cols = max(1, min(cols, len(tiles)))
    width = cols * tile + (cols + 1) * _GAP
    note = (f"{split}: {num_wrong} of {len(images)} images wrong, the most confident mistakes first "
            f"({len(tiles)} shown); caption: true class / predicted class and its probability")
    rows = [_text_strip(line, width) for line in _wrap(note, width - 8)]
    if not tiles:
        rows.append(_text_strip("no wrong images", width))
    for start in range(0, len(tiles), cols):
        row = tiles[start : start + cols]
        canvas = np.full((max(t.shape[0] for t in row) + _GAP, width, 3), 255, np.uint8)
        for c, t in enumerate(row):
            x = _GAP + c * (tile + _GAP)
            canvas[: t.shape[0], x : x + t.shape[1]] = t
        rows.append(canvas)
    return np.vstack(rows)


def _tile(rank: int, image: ClassImage, classes: Sequence[str], pred: int, prob: float, tile: int) -> np.ndarray:
    """Caption, rank and file name, then the image scaled so its longer side is `tile`."""
    from rtmdet.evaluation.plots import _shorten, _text_strip
    from rtmdet.imageio import read_image

    picture = read_image(image.file)
    scale = tile / max(picture.shape[:2])
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    small = cv2.resize(picture, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    caption = _caption(classes[image.label], classes[pred], prob, tile - 8)
    where = _text_strip(f"#{rank} {_shorten(image.file.name, 24)}", tile, _CAPTION_H, (80, 80, 80))
    out = np.full((2 * _CAPTION_H + tile, tile, 3), 255, np.uint8)
    out[:_CAPTION_H] = _text_strip(caption, tile, _CAPTION_H, (0, 0, 160))
    out[_CAPTION_H : 2 * _CAPTION_H] = where
    out[2 * _CAPTION_H : 2 * _CAPTION_H + small.shape[0], : small.shape[1]] = small
    return out


def _caption(true: str, pred: str, prob: float, width: int) -> str:
    """"true X / pred Y 0.93", the class names cut in the middle until it fits `width` pixels."""
    from rtmdet.evaluation.plots import _shorten, _text_width

    for limit in (40, 20, 14, 10, 7, 5):
        text = f"true {_shorten(true, limit)} / pred {_shorten(pred, limit)} {prob:.2f}"
        if _text_width(text) <= width:
            break
    return text


def _wrap(text: str, width: int) -> list[str]:
    from rtmdet.evaluation.plots import _text_width

    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)  # as worst_images ranks them
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)
