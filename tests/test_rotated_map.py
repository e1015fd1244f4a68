"""DOTA-style rotated mAP: hand-worked cases for matching, difficult boxes and both AP modes."""

from __future__ import annotations

import numpy as np
import pytest

from rtmdet.evaluation.rotated_map import (
    RotatedDetections,
    RotatedTruth,
    average_precision,
    rotated_map,
    rotated_map_50_95,
)

A = [20.0, 20.0, 20.0, 8.0, 0.3]
B = [70.0, 60.0, 10.0, 30.0, -0.8]


def _truth(boxes, labels, difficult=None):
    return RotatedTruth(np.array(boxes, np.float64).reshape(-1, 5), np.array(labels, np.int64),
                        np.array(difficult if difficult is not None else [False] * len(labels), bool))


def _dets(boxes, scores, labels):
    return RotatedDetections(np.array(boxes, np.float64).reshape(-1, 5), np.array(scores, np.float64),
                             np.array(labels, np.int64))


def test_perfect_missing_duplicate_and_wrong_class():
    truth = [_truth([A, B], [0, 0])]
    assert rotated_map([_dets([A, B], [0.9, 0.8], [0, 0])], truth, 1)["mAP"] == pytest.approx(1.0)
    # One of two found: recall reaches 0.5 with precision 1 -> 6 of the 11 points.
    assert rotated_map([_dets([A], [0.9], [0])], truth, 1)["mAP"] == pytest.approx(6 / 11)
    assert rotated_map([_dets([A], [0.9], [0])], truth, 1, mode="area")["mAP"] == pytest.approx(0.5)
    # A duplicate of A ranked above B: precision at recall 1 is 2/3.
    dup = rotated_map([_dets([A, A, B], [0.9, 0.85, 0.8], [0, 0, 0])], truth, 1, mode="area")
    assert dup["mAP"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    # The right box with the wrong label finds nothing; class 1 has no ground truth: not averaged.
    wrong = rotated_map([_dets([A, B], [0.9, 0.8], [1, 1])], truth, 2)
    assert wrong["mAP"] == 0.0 and wrong["per_class"][1]["num_gts"] == 0


def test_difficult_boxes_neither_help_nor_hurt():
    truth = [_truth([A, B], [0, 0], [False, True])]
    found_both = rotated_map([_dets([A, B], [0.9, 0.95], [0, 0])], truth, 1)
    assert found_both["mAP"] == pytest.approx(1.0) and found_both["per_class"][0]["num_gts"] == 1


def test_iou_threshold_and_range():
    # A moved 4 px along its own width axis: IoU (20 - 4) * 8 / ((20 + 4) * 8) = 2/3.
    shifted = [A[0] + 4.0 * np.cos(A[4]), A[1] + 4.0 * np.sin(A[4]), *A[2:]]
    truth = [_truth([A], [0])]
    dets = [_dets([shifted], [0.9], [0])]
    assert rotated_map(dets, truth, 1, iou_thr=0.5)["mAP"] == pytest.approx(1.0)
    assert rotated_map(dets, truth, 1, iou_thr=0.7)["mAP"] == 0.0
    r = rotated_map_50_95(dets, truth, 1)
    assert r["mAP50"] == 1.0 and r["mAP75"] == 0.0 and r["mAP50_95"] == pytest.approx(4 / 10)  # 0.50..0.65 hit


def test_average_precision_modes_and_bad_mode():
    recall, precision = np.array([0.2, 0.4, 0.4, 0.8]), np.array([1.0, 1.0, 0.67, 0.8])
    assert average_precision(recall, precision, "area") == pytest.approx(0.4 * 1.0 + 0.4 * 0.8)
    assert average_precision(recall, precision, "11points") == pytest.approx((5 * 1.0 + 4 * 0.8) / 11)
    with pytest.raises(ValueError, match="AP mode 'coco'"):
        average_precision(recall, precision, "coco")
    with pytest.raises(ValueError, match="2 images of detections but 1"):
        rotated_map([_dets([A], [1], [0])] * 2, [_truth([A], [0])], 1)
