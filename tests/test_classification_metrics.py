"""Classifier metrics: top-k, per-class precision/recall/F1, confusion, the worst images, the figure."""

from __future__ import annotations

import numpy as np
import pytest

from rtmdet.evaluation.classification import classification_result, confusion_figure, worst_images
from rtmdet.evaluation.plots import figure_png

CLASSES = ["a", "b", "c", "d", "e", "f"]


def test_topk_precision_recall_and_confusion():
    scores = np.array([
        [9, 1, 0, 0, 0, 0],  # a -> a
        [1, 9, 0, 0, 0, 0],  # a -> b (a is 2nd)
        [0, 9, 1, 0, 0, 0],  # b -> b
        [0, 0, 1, 2, 3, 4],  # c -> f, c 5th: a top-5 hit
        [0, 0, 0, 1, 2, 3],  # d -> f, d 4th
        [5, 4, 3, 2, 1, 0],  # e -> a, e 5th
        [0, 0, 0, 0, 0, 9],  # f -> f
    ], float)
    labels = np.array([0, 0, 1, 2, 3, 4, 5])
    r = classification_result(scores, labels, CLASSES)
    assert r.top1 == pytest.approx(3 / 7) and r.top5 == pytest.approx(7 / 7)
    assert r.confusion[0].tolist() == [1, 1, 0, 0, 0, 0] and r.confusion[:, 5].sum() == 3
    a, b, c, _, _, f = r.per_class
    assert (a["precision"], a["recall"], a["support"]) == (0.5, 0.5, 2)
    assert (b["precision"], b["recall"]) == (0.5, 1.0) and b["f1"] == pytest.approx(2 / 3)
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)  # never predicted
    assert f["precision"] == pytest.approx(1 / 3)
    m = r.metrics()
    assert m["top1"] == r.top1 and m["recall/b"] == 1.0 and m["precision"] == pytest.approx(np.mean(
        [row["precision"] for row in r.per_class]))
    assert worst_images(scores, labels) == [1, 5, 3, 4]  # wrong ones by softmax of the guess: .9997 .634 .629 .605
    assert figure_png(confusion_figure(r))[:4] == b"\x89PNG"


def test_few_classes_have_no_top5_and_bad_shapes_fail():
    r = classification_result(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]), ["x", "y"])
    assert r.top5 is None and r.top1 == 0.5
    with pytest.raises(ValueError, match="do not fit 3 classes"):
        classification_result(np.zeros((2, 2)), np.zeros(2), ["x", "y", "z"])
    with pytest.raises(ValueError, match="no images"):
        classification_result(np.zeros((0, 2)), np.zeros(0), ["x", "y"])
