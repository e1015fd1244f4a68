"""Confusion matching on hand-made cases, worst-first ranking, and the evaluation figures."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from rtmdet.data.records import ImageRecord
from rtmdet.evaluation import evaluate_results
from rtmdet.evaluation.confusion import (
    ConfusionMatrix,
    ImageErrors,
    confusion_matrix,
    image_errors,
    match_image,
    rank_worst,
)
from rtmdet.evaluation.plots import (
    confusion_figure,
    figure_png,
    image_png,
    per_class_ap_figure,
    pr_curves_figure,
    worst_images_grid,
)
from rtmdet.inference.detections import Detections
from rtmdet.visualize import class_color

CLASSES = ["cat", "dog", "mask_weared_incorrect"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
A = [10, 10, 50, 50]
B = [100, 100, 160, 140]
FAR = [200, 10, 230, 40]


def _record(image_id: int, boxes, labels, crowd=(), file: Path = Path("none.jpg")) -> ImageRecord:
    return ImageRecord(
        image_id=image_id, file=file, width=320, height=240,
        boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
        areas=np.ones(len(labels), np.float32),
        crowd_boxes=np.array(crowd, np.float32).reshape(-1, 4), crowd_labels=np.zeros(len(crowd), np.int64),
    )  # fmt: skip


def _dets(boxes, scores, labels) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(labels, np.int64), CLASSES, (240, 320))  # fmt: skip


def _shift(box, dx):
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


# ---------------------------------------------------------------- matching one image


def test_hit_miss_and_false_alarm():
    m = match_image(np.array([A, B]), np.array([0, 1]), np.array([_shift(A, 2), FAR]),
                    np.array([0.9, 0.8]), np.array([0, 1]))  # fmt: skip
    assert m.gt_to_pred.tolist() == [0, -1]  # A hit, B missed
    assert m.pred_to_gt.tolist() == [0, -1]  # FAR is a false alarm
    assert not m.ignored.any()


def test_class_swap_is_matched_across_classes():
    m = match_image(np.array([A]), np.array([0]), np.array([A]), np.array([0.9]), np.array([1]))
    assert m.gt_to_pred.tolist() == [0] and m.pred_to_gt.tolist() == [0]


def test_duplicate_detection_is_a_false_alarm_and_the_higher_score_wins():
    m = match_image(np.array([A]), np.array([0]), np.array([_shift(A, 1), A]), np.array([0.5, 0.9]),
                    np.array([0, 0]))  # fmt: skip
    assert m.gt_to_pred.tolist() == [1]  # the 0.9 detection, though listed second
    assert m.pred_to_gt.tolist() == [-1, 0]


def test_right_class_is_preferred_over_a_higher_scoring_wrong_class():
    # A dog box at 0.9 and a cat box at 0.6 on one cat: a hit plus a false alarm, not a swap.
    m = match_image(np.array([A]), np.array([0]), np.array([A, A]), np.array([0.9, 0.6]), np.array([1, 0]))
    assert m.gt_to_pred.tolist() == [1] and m.pred_to_gt.tolist() == [-1, 0]


def test_iou_below_threshold_does_not_match():
    m = match_image(np.array([A]), np.array([0]), np.array([_shift(A, 20)]), np.array([0.9]), np.array([0]))
    assert m.gt_to_pred.tolist() == [-1]  # IoU 20*40 / (2*1600 - 800) = 1/3


def test_detection_on_crowd_region_is_ignored_not_a_false_alarm():
    m = match_image(np.zeros((0, 4)), np.zeros(0), np.array([[105, 105, 130, 130], FAR]),
                    np.array([0.9, 0.9]), np.array([0, 0]), crowd_boxes=np.array([B]))  # fmt: skip
    assert m.ignored.tolist() == [True, False]


def test_no_detections_and_no_ground_truth():
    m = match_image(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    assert m.gt_to_pred.size == 0 and m.pred_to_gt.size == 0


# ---------------------------------------------------------------- confusion matrix of a split


def _split():
    records = [
        _record(1, [A, B], [0, 1]),  # cat hit, dog swapped to cat
        _record(2, [A], [1]),  # dog missed (its detection is under the threshold)
        _record(3, [], []),  # background only: one false alarm, one ignored on a crowd region
        _record(4, [A], [2]),  # duplicate detections of one mask_weared_incorrect
    ]
    records[2].crowd_boxes = np.array([B], np.float32)
    dets = {
        1: _dets([A, B], [0.9, 0.8], [0, 0]),
        2: _dets([A], [0.1], [1]),
        3: _dets([FAR, [105, 105, 130, 130]], [0.7, 0.6], [1, 0]),
        4: _dets([A, _shift(A, 1)], [0.95, 0.9], [2, 2]),
    }
    return records, dets


def test_confusion_matrix_on_hand_cases():
    records, dets = _split()
    cm = confusion_matrix(records, dets, CLASSES, score_thr=0.3, iou_thr=0.5)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 1  # cat hit
    expected[1, 0] = 1  # dog detected as cat
    expected[1, 3] = 1  # dog missed
    expected[2, 2] = 1  # mask_weared_incorrect hit
    expected[3, 2] = 1  # its duplicate: a false alarm
    expected[3, 1] = 1  # dog box on empty background
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.labels == [*CLASSES, "background"]
    per = {r["name"]: r for r in cm.per_class()}
    assert (per["cat"]["tp"], per["cat"]["fp"], per["cat"]["fn"]) == (1, 1, 0)
    assert (per["dog"]["tp"], per["dog"]["fp"], per["dog"]["fn"]) == (0, 1, 2)
    assert per["dog"]["precision"] == 0.0 and per["cat"]["recall"] == 1.0
    assert cm.totals() == {"tp": 2, "fp": 3, "fn": 2, "precision": 0.4, "recall": 0.5, "f1": 4 / 9}
    rows = cm.normalized().sum(axis=1)
    np.testing.assert_allclose(rows, [1, 1, 1, 1])


def test_confusion_threshold_keeps_low_scores_when_asked():
    records, dets = _split()
    cm = confusion_matrix(records, dets, CLASSES, score_thr=0.05)
    assert cm.matrix[1, 1] == 1 and cm.matrix[1, 3] == 0  # the 0.1 dog now counts as a hit


def test_confusion_totals_are_none_when_undefined():
    cm = ConfusionMatrix(["cat"], np.zeros((2, 2), np.int64), 0.3, 0.5)
    assert cm.totals()["precision"] is None and cm.per_class()[0]["recall"] is None
    assert not np.isnan(cm.normalized()).any()


# ---------------------------------------------------------------- worst first


def test_image_errors_and_worst_first_order():
    records, dets = _split()
    errors = {e.image_id: e for e in image_errors(records, dets, score_thr=0.3)}
    assert (errors[1].hits, errors[1].swaps, errors[1].misses, errors[1].false_alarms) == (1, 1, 0, 0)
    assert (errors[2].misses, errors[2].num_pred) == (1, 0)
    assert (errors[3].false_alarms, errors[3].num_pred) == (1, 1)  # the crowd one is ignored
    assert (errors[4].hits, errors[4].false_alarms) == (1, 1)
    order = [e.image_id for e in rank_worst(list(errors.values()))]
    # One mistake each; F1 breaks the tie (images 2 and 3: 0, image 1: 1/2, image 4: 2/3), then id.
    assert order == [2, 3, 1, 4]


def test_rank_worst_puts_most_mistakes_first():
    def err(i, misses, fa, hits, gt):
        return ImageErrors(i, num_gt=gt, num_pred=hits + fa, hits=hits, swaps=0, misses=misses, false_alarms=fa)

    ranked = rank_worst([err(1, 0, 0, 0, 0), err(2, 1, 0, 4, 5), err(3, 3, 2, 10, 13), err(4, 1, 0, 0, 1)])
    assert [e.image_id for e in ranked] == [3, 4, 2, 1]
    assert ranked[-1].f1 == 1.0  # nothing to find, nothing found


# ---------------------------------------------------------------- figures


def _eval_result(num_classes: int = 3, with_results: bool = True):
    names = CLASSES if num_classes == 3 else [f"class_{i}_long_name" for i in range(num_classes)]
    ids = list(range(1, num_classes + 1))
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 240} for i in range(6)]
    anns, results = [], []
    for img in images:
        for k in range(3):
            c = ids[(img["id"] + k) % (num_classes - 1)]  # the last class stays absent
            x, y = rng.uniform(0, 200, 2)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": c,
                         "bbox": [x, y, 40, 30], "area": 1200.0, "iscrowd": 0})  # fmt: skip
            results.append({"image_id": img["id"], "category_id": c, "bbox": [x + 3, y, 40, 30],
                            "score": float(rng.uniform(0.1, 1))})  # fmt: skip
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": i, "name": n} for i, n in zip(ids, names)]}  # fmt: skip
    return evaluate_results(gt, results if with_results else [], names, ids)


def _is_png(data: bytes) -> bool:
    return data.startswith(PNG_SIGNATURE) and len(data) > 2000


@pytest.mark.parametrize("with_results", [True, False])
def test_figures_render_with_an_absent_class_and_with_no_predictions(with_results):
    result = _eval_result(with_results=with_results)
    assert result.per_class[-1]["absent"]
    records, dets = _split()
    cm = confusion_matrix(records, dets, CLASSES)
    for fig in (pr_curves_figure(result, "PR"), confusion_figure(cm), per_class_ap_figure(result)):
        png = figure_png(fig)
        assert _is_png(png)
        assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape[0] > 300


def test_figures_with_many_classes():
    result = _eval_result(num_classes=45)
    cm = ConfusionMatrix(result.classes, np.eye(46, dtype=np.int64) * 5, 0.3, 0.5)
    assert _is_png(figure_png(pr_curves_figure(result)))
    assert _is_png(figure_png(confusion_figure(cm)))  # normalized panel only, no cell numbers
    assert _is_png(figure_png(per_class_ap_figure(result)))


def test_worst_images_grid_shape_and_png(tmp_path):
    records, dets = _split()
    for rec, shape in zip(records, [(240, 320), (200, 120), (240, 320), (64, 96)]):
        rec.file = tmp_path / f"{rec.image_id}.jpg"
        cv2.imwrite(str(rec.file), np.full((*shape, 3), 40 * rec.image_id, np.uint8))
    ranked = rank_worst(image_errors(records, dets, 0.3))
    grid = worst_images_grid(records, dets, ranked, CLASSES, 0.3, num_images=3, tile=200, cols=2)
    assert grid.dtype == np.uint8 and grid.ndim == 3
    assert grid.shape[1] == 2 * (2 * 200 + 8) + 2 * 8  # two pairs per row
    png = image_png(grid, keep_colors=[class_color(i) for i in range(len(CLASSES))])
    assert _is_png(png)
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == grid.shape
    # The palette keeps class colours exactly (the legend swatches, the boxes).
    for label in range(len(CLASSES)):
        where = (grid == class_color(label)).all(axis=2)
        assert where.sum() >= 14 * 14  # at least its legend swatch
        assert (decoded[where] == class_color(label)).all()
    empty = worst_images_grid(records, dets, [], CLASSES, 0.3)
    assert empty.shape[0] > 0
