"""COCO segm scoring: masks, not boxes, decide the matches; the ground truth's own masks score 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from rtmdet.data.coco import load_dataset
from rtmdet.data.loader import load_record
from rtmdet.data.synthetic import make_synthetic_dataset
from rtmdet.data.masks import masks_to_rles
from rtmdet.evaluation.coco_eval import CocoScorer, coco_gt_from_split


def _gt_with_one_square() -> dict:
    mask = np.zeros((1, 20, 20), bool)
    mask[0, :10, :10] = True
    (rle,) = masks_to_rles(mask)
    return {"images": [{"id": 7, "width": 20, "height": 20, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100.0,
                             "iscrowd": 0, "segmentation": rle}],
            "categories": [{"id": 3, "name": "square"}]}


def test_segm_matches_by_mask_iou_by_hand():
    # The detection's box is the gt's box (IoU 1) but its mask covers 8 of the 10 columns: mask IoU
    # 80 / 100 = 0.8, a match at IoU thresholds 0.50 ... 0.80 (7 of the 10): mask AP 0.7, box AP 1.
    det = np.zeros((1, 20, 20), bool)
    det[0, :10, :8] = True
    gt = _gt_with_one_square()
    args = (np.array([7]), np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([0.9]), np.array([0]))
    segm = CocoScorer(gt, ["square"], [3], iou_type="segm").score_arrays(*args, rles=masks_to_rles(det))
    box = CocoScorer(gt, ["square"], [3]).score_arrays(*args)
    assert segm.stats["mAP"] == pytest.approx(0.7) and segm.stats["mAP50"] == 1.0 and segm.stats["mAP75"] == 1.0
    assert box.stats["mAP"] == pytest.approx(1.0)
    assert segm.results[0]["segmentation"]["size"] == [20, 20]  # a COCO results file, JSON-safe


def test_masks_to_rles_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 13, 17)) > 0.5
    rles = masks_to_rles(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    back = np.stack([mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in rles])
    assert np.array_equal(back.astype(bool), masks)
    assert masks_to_rles(np.zeros((0, 4, 4), bool)) == []


def test_ground_truth_masks_as_detections_score_one(tmp_path: Path):
    root = make_synthetic_dataset(tmp_path / "shapes", seed=5, train=2, valid=6)
    dataset = load_dataset(root, masks=True)
    split = dataset.splits["valid"]
    gt = coco_gt_from_split(split, dataset, masks=True)
    assert all("segmentation" in a for a in gt["annotations"])
    ids, boxes, labels, rles = [], [], [], []
    for rec in split.records:
        sample = load_record(rec)
        ids += [rec.image_id] * len(rec.labels)
        boxes.append(rec.boxes)
        labels.append(rec.labels)
        rles += masks_to_rles(sample.masks)
    result = CocoScorer(gt, dataset.classes, dataset.category_ids, iou_type="segm").score_arrays(
        np.array(ids), np.concatenate(boxes), np.ones(len(ids)), np.concatenate(labels), rles=rles)
    assert len(ids) > 3 and result.stats["mAP"] == pytest.approx(1.0)
    with pytest.raises(Exception, match="without its instance masks"):
        coco_gt_from_split(load_dataset(root).splits["valid"], dataset, masks=True)
