"""COCO bbox and segm evaluation (pycocotools' COCOeval, run by faster-coco-eval): the 12 stats, per-class AP, PR data.

Ground truth is built from the validated records (not the raw user file, which may hold boxes
the reader rejected); results carry the dataset's original category ids, so a results file
written from `EvalResult.results` scores the same against the user's own annotation file with
any COCO tool. Numbers COCOeval reports as -1 ("no ground truth here") become None.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rtmdet.data.masks import rle_bytes
from rtmdet.data.records import DetectionDataset, DetectionSplit
from rtmdet.errors import DataError
from rtmdet.inference.detections import Detections

STAT_NAMES = (
    "mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip

# (AP or AR, IoU label, area range, maxDets) of each of COCOeval.summarize's 12 lines.
_SUMMARY_LINES = (
    ("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100),
    ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100),
    ("AR", "0.50:0.95", "large", 100),
)  # fmt: skip

# Results are rounded so files stay small; 1e-3 px and 1e-5 in score are far below what moves
# an IoU threshold or a ranking in practice, and the rounded list is exactly what we score.
BOX_DECIMALS = 3
SCORE_DECIMALS = 5


@dataclass
class EvalResult:
    """COCO bbox scores of one split.

    stats: the 12 COCO numbers under STAT_NAMES (None where COCOeval says -1: no ground truth
    in that area range). per_class: one dict per dataset class, in label order, with name,
    category_id, AP, AP50, num_gt, absent (absent classes have AP/AP50 None).
    precision is COCOeval's eval['precision'] [T, R, K, A, M] with -1 kept; its K axis follows
    cat_ids (sorted category ids, COCOeval's order), so use pr_curve() rather than indexing.
    """

    stats: dict[str, float | None]
    per_class: list[dict[str, Any]]
    precision: np.ndarray
    recall: np.ndarray
    cat_ids: list[int]
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    summary: str  # COCOeval.summarize()'s own 12 lines, verbatim
    results: list[dict[str, Any]]  # what was scored, COCO results format, original category ids
    classes: list[str]
    category_ids: list[int]
    num_images: int
    images_per_s: float | None = None
    seconds: float | None = None  # wall time of the detector loop (see evaluate_detector)
    detections: dict[int, Detections] | None = field(default=None, repr=False)
    masks: EvalResult | None = None  # the segment task: the same detections scored by their masks (segm)

    def pr_curve(self, label: int, iou: float | None = 0.5) -> tuple[np.ndarray, np.ndarray] | None:
        """(recall, precision) of class `label` at one IoU, or averaged over 0.50:0.95 when iou
        is None; area 'all', maxDets 100. None when the class has no ground truth in the split."""
        k = self.cat_ids.index(self.category_ids[label])
        if iou is None:
            curves = self.precision[:, :, k, 0, -1]
        else:
            t = np.flatnonzero(np.isclose(self.iou_thrs, iou))
            if t.size != 1:
                raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {self.iou_thrs}")
            curves = self.precision[t, :, k, 0, -1]
        if (curves < 0).any():
            return None
        return self.rec_thrs.copy(), curves.mean(axis=0)

    def to_metrics(self) -> dict[str, float | int | None]:
        """Flat JSON-safe metrics: the 12 stats, AP/<class> and AP50/<class>, images_per_s."""
        metrics: dict[str, float | int | None] = dict(self.stats)
        for row in self.per_class:
            metrics[f"AP/{row['name']}"] = row["AP"]
        for row in self.per_class:
            metrics[f"AP50/{row['name']}"] = row["AP50"]
        if self.masks is not None:
            metrics.update({f"mask_{k}": v for k, v in self.masks.to_metrics().items()
                            if k not in ("images_per_s", "num_images")})
        metrics["images_per_s"] = self.images_per_s
        metrics["num_images"] = self.num_images
        return metrics


def coco_gt_from_split(split: DetectionSplit, dataset: DetectionDataset, masks: bool = False) -> dict[str, Any]:
    """A COCO ground-truth dict (original image and category ids) from a validated split; with
    `masks`, each annotation's segmentation too (segm evaluation; the split must be read with them).

    Crowd boxes go in with iscrowd=1 and their own class, so COCOeval ignores detections of that
    class matched to them (for segm, the crowd region is its box).
    """
    images, annotations = [], []
    cat_of = [int(c) for c in dataset.category_ids]
    for rec in split.records:
        try:
            file_name = rec.file.relative_to(split.img_dir).as_posix()
        except ValueError:
            file_name = rec.file.name
        images.append({"id": int(rec.image_id), "file_name": file_name,
                       "width": int(rec.width), "height": int(rec.height)})  # fmt: skip
        if masks and rec.segmentations is None and len(rec.boxes):
            raise DataError(f"{split.ann_file}: image id {rec.image_id} was read without its instance masks")
        for k, (box, label, area) in enumerate(zip(rec.boxes, rec.labels, rec.areas, strict=True)):
            annotations.append(_gt_ann(rec.image_id, cat_of[int(label)], box, area, 0))
            if masks:
                annotations[-1]["segmentation"] = rec.segmentations[k]
        for box, label in zip(rec.crowd_boxes, rec.crowd_labels, strict=True):
            area = (box[2] - box[0]) * (box[3] - box[1])
            annotations.append(_gt_ann(rec.image_id, cat_of[int(label)], box, area, 1))
            if masks:
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations[-1]["segmentation"] = [[x1, y1, x2, y1, x2, y2, x1, y2]]
    for i, ann in enumerate(annotations):
        ann["id"] = i + 1
    categories = [{"id": int(c), "name": n, "supercategory": "none"}
                  for n, c in zip(dataset.classes, dataset.category_ids, strict=True)]  # fmt: skip
    info = {"description": f"split '{split.name}' of {split.ann_file}"}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _gt_ann(image_id: int, category_id: int, box: np.ndarray, area: float, crowd: int) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"image_id": int(image_id), "category_id": int(category_id),
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area), "iscrowd": crowd}  # fmt: skip


def detections_to_coco_results(
    dets_by_image_id: dict[int, Detections], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results (image_id, original category_id, bbox xywh, score), boxes and scores rounded
    to BOX_DECIMALS / SCORE_DECIMALS."""
    parts = [(image_id, np.asarray(d.boxes, np.float64).reshape(-1, 4), np.asarray(d.scores, np.float64).reshape(-1),
              np.asarray(d.labels).reshape(-1)) for image_id, d in dets_by_image_id.items()]
    if not parts:
        return []
    ids = np.concatenate([np.full(len(p[3]), p[0], np.int64) for p in parts])
    return coco_results_from_arrays(ids, *(np.concatenate([p[k] for p in parts]) for k in (1, 2, 3)),
                                    category_ids=category_ids)


def coco_results_from_arrays(image_ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                             category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results from flat arrays over all images: image ids [N], xyxy boxes [N, 4], scores
    [N], class indices [N]; whole arrays at a time (tens of thousands of detections in ms)."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(category_ids)):
        bad = int(labels.max() if labels.max() >= len(category_ids) else labels.min())
        where = int(np.asarray(image_ids).reshape(-1)[np.argmax((labels < 0) | (labels >= len(category_ids)))])
        raise DataError(f"detections for image id {where}: class index {bad} is outside "
                        f"the dataset's {len(category_ids)} classes")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    # numpy's rounding (scale, rint, unscale) can differ from round() by one unit of the last
    # decimal in rare halfway cases: far below what moves a match.
    xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1), BOX_DECIMALS)
    cats = np.asarray(category_ids, dtype=np.int64)[labels]
    scores = np.round(np.asarray(scores, np.float64).reshape(-1), SCORE_DECIMALS)
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(np.asarray(image_ids).reshape(-1).tolist(), cats.tolist(), xywh.tolist(),
                                  scores.tolist())]


def evaluate_results(
    gt: dict[str, Any], results: list[dict[str, Any]], classes: Sequence[str],
    category_ids: Sequence[int],
) -> EvalResult:  # fmt: skip
    """Score COCO results against a ground-truth dict: COCOeval's bbox evaluation, default params.

    faster-coco-eval's C++ COCOeval does the matching: pycocotools' algorithm and numbers (a
    test compares all 12 stats and the precision arrays on facemask; they agree to float64
    summation order, ~1e-16) at several times its speed. Its summary is written in
    pycocotools' own 12-line format. An empty results list is scored as all misses.
    """
    _check_results(gt, results)
    return CocoScorer(gt, classes, category_ids).score(results)


class CocoScorer:
    """One ground truth scored again and again (validation during training): the ground truth is
    indexed once, and `score_arrays` turns flat detection arrays straight into COCOeval's
    detection index, without the results list and loadRes round trip. Same numbers as
    `evaluate_results` (tests/test_coco_eval.py compares every stat and the precision arrays)."""

    def __init__(self, gt: dict[str, Any], classes: Sequence[str], category_ids: Sequence[int],
                 iou_type: str = "bbox"):
        """iou_type: bbox, or segm (the ground truth carries segmentations; results carry RLEs)."""
        from faster_coco_eval import COCO

        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type {iou_type!r}: use bbox or segm")
        self.iou_type = iou_type
        self.classes, self.category_ids = list(classes), [int(c) for c in category_ids]
        # COCOeval writes an 'ignore' key into gt annotations (the same value every time): it
        # gets its own copies, so the caller's dicts stay as they were.
        self.gt = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        self.coco_gt = COCO()
        self.coco_gt.dataset = self.gt
        self.coco_gt.createIndex()

    def score(self, results: list[dict[str, Any]]) -> EvalResult:
        """COCO results (image_id, category_id, bbox xywh, score) -> EvalResult; loadRes adds its
        keys to copies of them."""
        if results:
            coco_dt = self.coco_gt.loadRes([dict(r) for r in results])
        else:
            coco_dt = self._index([])
        return self._evaluate(coco_dt, results)

    def score_arrays(self, image_ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                     labels: np.ndarray, rles: Sequence[dict[str, Any]] | None = None) -> EvalResult:
        """Flat arrays over all images (as `coco_results_from_arrays` takes them) -> EvalResult.
        The detections get what loadRes would give them (area, id, iscrowd), rounded as results
        are; for segm, `rles` holds each detection's mask (masks_to_rles) and the area is its area."""
        results = coco_results_from_arrays(image_ids, boxes, scores, labels, self.category_ids)
        if self.iou_type == "segm":
            from pycocotools import mask as mask_utils

            if rles is None or len(rles) != len(results):
                raise ValueError("segm scoring needs one RLE per detection")
            for r, rle in zip(results, rles):
                r["segmentation"] = rle
            areas = [float(mask_utils.area(rle_bytes(rle))) for rle in rles]
        else:
            areas = [r["bbox"][2] * r["bbox"][3] for r in results]
        anns = [{**r, "area": a, "id": k, "iscrowd": 0} for k, (r, a) in enumerate(zip(results, areas), start=1)]
        return self._evaluate(self._index(anns), results)

    def _index(self, anns: list[dict[str, Any]]) -> Any:
        from faster_coco_eval import COCO

        coco_dt = COCO()
        coco_dt.dataset = {"images": list(self.gt["images"]), "categories": list(self.gt["categories"]),
                           "annotations": anns}  # fmt: skip
        coco_dt.createIndex()
        return coco_dt

    def _evaluate(self, coco_dt: Any, results: list[dict[str, Any]]) -> EvalResult:
        from faster_coco_eval import COCOeval_faster

        ev = COCOeval_faster(self.coco_gt, coco_dt, iouType=self.iou_type, print_function=lambda *args: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        values = [float(v) for v in ev.stats[: len(STAT_NAMES)]]
        stats = {name: _none_if_negative(v) for name, v in zip(STAT_NAMES, values, strict=True)}
        precision = ev.eval["precision"]
        cat_ids = [int(c) for c in ev.params.catIds]
        return EvalResult(
            stats=stats,
            per_class=_per_class(self.gt, precision, cat_ids, self.classes, self.category_ids),
            precision=precision,
            recall=ev.eval["recall"],
            cat_ids=cat_ids,
            iou_thrs=np.asarray(ev.params.iouThrs),
            rec_thrs=np.asarray(ev.params.recThrs),
            summary=pycocotools_summary(values),
            results=results,
            classes=list(self.classes),
            category_ids=list(self.category_ids),
            num_images=len(self.gt["images"]),
        )


def pycocotools_summary(values: Sequence[float]) -> str:
    """COCOeval.summarize()'s 12 lines, character for character (-1.000 where there is no gt)."""
    lines = []
    for (kind, iou, area, max_dets), value in zip(_SUMMARY_LINES, values, strict=True):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
                     f"{value:0.3f}")
    return "\n".join(lines)


def _check_results(gt: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """Raise a DataError for results COCOeval would reject or silently drop."""
    where = gt.get("info", {}).get("description", "the ground truth")
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    for r in results:
        if r["image_id"] not in image_ids:
            raise DataError(
                f"results name image id {r['image_id']}, which is not an image of {where}"
            )
        if r["category_id"] not in cat_ids:
            raise DataError(
                f"results name category id {r['category_id']}, which is not a category of {where} "
                f"(known ids: {sorted(cat_ids)})"
            )


def _none_if_negative(v: float) -> float | None:
    return None if v < 0 or math.isnan(v) else float(v)


def _per_class(
    gt: dict[str, Any], precision: np.ndarray, cat_ids: list[int], classes: Sequence[str],
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:  # fmt: skip
    """AP (0.50:0.95) and AP50 per class, area 'all', maxDets 100, computed as summarize() does."""
    num_gt = Counter(a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0))
    rows = []
    for name, cat_id in zip(classes, category_ids, strict=True):
        k = cat_ids.index(int(cat_id))
        p = precision[:, :, k, 0, -1]
        p50 = p[0]  # iouThrs[0] == 0.5
        absent = num_gt[int(cat_id)] == 0
        rows.append({
            "name": name, "category_id": int(cat_id),
            "AP": None if absent or not (p > -1).any() else float(np.mean(p[p > -1])),
            "AP50": None if absent or not (p50 > -1).any() else float(np.mean(p50[p50 > -1])),
            "num_gt": int(num_gt[int(cat_id)]), "absent": bool(absent),
        })  # fmt: skip
    return rows


def evaluate_detector(
    detector: Callable[[list[Path]], list[Detections]], split: DetectionSplit,
    dataset: DetectionDataset, batch_size: int = 8, progress: bool = True,
) -> EvalResult:  # fmt: skip
    """Run `detector` over every image of `split` and score it.

    images_per_s times the whole detector loop and excludes nothing inside it: image reading,
    pre-processing, the model, decoding/NMS and any warm-up of the first batch; COCOeval's
    scoring afterwards is not timed.
    """
    names = getattr(detector, "class_names", None)
    if names is not None and list(names) != list(dataset.classes):
        raise DataError(
            f"the model's classes {list(names)} differ from the classes of {split.ann_file} "
            f"{list(dataset.classes)}"
        )
    records = split.records
    dets: dict[int, Detections] = {}
    bar = tqdm(total=len(records), unit="img", desc=f"evaluate {split.name}", disable=not progress)
    start = time.perf_counter()
    with bar:
        for i in range(0, len(records), batch_size):
            batch = records[i : i + batch_size]
            out = detector([rec.file for rec in batch])
            if len(out) != len(batch):
                raise ValueError(f"detector returned {len(out)} results for {len(batch)} images")
            for rec, d in zip(batch, out, strict=True):
                dets[int(rec.image_id)] = d
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    result = score_detections(dets, split, dataset)
    result.seconds = seconds
    result.images_per_s = len(records) / seconds if records and seconds > 0 else None
    return result


def score_detections(
    dets_by_image_id: dict[int, Detections], split: DetectionSplit, dataset: DetectionDataset
) -> EvalResult:  # fmt: skip
    """Score detections already made (keyed by original image id, labels in the dataset's class
    order) against `split`: the scoring half of evaluate_detector, for detectors that are not a
    `Detector` (a peer model in a benchmark). Images without an entry count as all misses.
    Detections with masks (the segment task) are scored by their masks too (result.masks; the
    split must be read with its masks)."""
    with_masks = any(d.masks is not None for d in dets_by_image_id.values())
    gt = coco_gt_from_split(split, dataset, masks=with_masks)
    results = detections_to_coco_results(dets_by_image_id, dataset.category_ids)
    result = evaluate_results(gt, results, dataset.classes, dataset.category_ids)
    if with_masks:
        rles = [r for d in dets_by_image_id.values() for r in (d.masks or [])]
        if len(rles) != len(results):
            raise ValueError("detections with masks must carry one mask per box")
        segm = [{**r, "segmentation": rle} for r, rle in zip(results, rles)]
        result.masks = CocoScorer(gt, dataset.classes, dataset.category_ids, "segm").score(segm)
    result.detections = dets_by_image_id
    return result


def format_coco_table(result: EvalResult) -> str:
    """The familiar 12-line COCO summary (n/a where COCO prints -1) and a per-class AP table."""
    lines = []
    for name, (kind, iou, area, max_dets) in zip(STAT_NAMES, _SUMMARY_LINES, strict=True):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        value = result.stats[name]
        shown = "  n/a" if value is None else f"{value:0.3f}"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | "
                     f"maxDets={max_dets:>3d} ] = {shown}")  # fmt: skip
    width = max([len("class")] + [len(r["name"]) for r in result.per_class])
    lines += ["", f"{'class':<{width}}  {'num_gt':>6}  {'AP':>6}  {'AP50':>6}"]
    for r in result.per_class:
        ap = " n/a" if r["AP"] is None else f"{r['AP']:.3f}"
        ap50 = " n/a" if r["AP50"] is None else f"{r['AP50']:.3f}"
        note = "  (absent from this split)" if r["absent"] else ""
        lines.append(f"{r['name']:<{width}}  {r['num_gt']:>6d}  {ap:>6}  {ap50:>6}{note}")
    if result.images_per_s is not None:
        lines += ["", f"{result.num_images} images, {result.images_per_s:.1f} images/s"]
    return "\n".join(lines)
