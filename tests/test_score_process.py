"""Validation's scoring process: the same metrics as scoring in-process, errors that reach the
trainer, a fallback when the child dies, and no child left behind."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from rtmdet.errors import DataError
from rtmdet.evaluation import CocoScorer, coco_gt_from_split
from rtmdet.evaluation.score_process import ScoreProcess, score_table
from test_coco_eval import _fake_predictions, _record, _toy


def _setup():
    rng = np.random.default_rng(0)
    records = [_record(i, [[10 + i, 20, 60 + i, 90], [100, 100, 150, 180]], [0, 1]) for i in range(6)]
    split, dataset = _toy(records)
    dets = _fake_predictions(split, 2, seed=1)
    rows = [np.concatenate([d.boxes, d.scores[:, None], d.labels[:, None], np.full((len(d.scores), 1), k)], axis=1)
            for k, d in enumerate(dets.values())]
    table = np.concatenate(rows).astype(np.float32)
    ids = [r.image_id for r in split.records]
    rng.shuffle(table)
    return split, dataset, table, ids


def test_child_scores_as_the_training_process_would_and_ends_when_closed() -> None:
    split, dataset, table, ids = _setup()
    gt = coco_gt_from_split(split, dataset)
    local = score_table(CocoScorer(gt, dataset.classes, dataset.category_ids), np.asarray(ids), table)
    proc = ScoreProcess(gt, dataset.classes, dataset.category_ids, ids)
    try:
        first, second = proc.submit(table).result(timeout=60), proc.submit(table[:0]).result(timeout=60)
        again = proc.submit(table).result(timeout=60)
    finally:
        child = proc.child
        proc.close()
    assert 0.3 < first["mAP"] < 1.0
    for got in (first, again):
        assert {k: v for k, v in got.items() if k != "scoring_s"} == {k: v for k, v in local.items() if k != "scoring_s"}
    assert second["mAP"] == 0.0
    assert child.returncode == 0 and proc.child is None


def test_errors_reach_the_caller_and_a_dead_child_falls_back_to_in_process(caplog: pytest.LogCaptureFixture) -> None:
    split, dataset, table, ids = _setup()
    proc = ScoreProcess(coco_gt_from_split(split, dataset), dataset.classes, dataset.category_ids, ids)
    try:
        bad = table.copy()
        bad[0, 5] = 7  # class index 7 of a 2-class dataset
        with pytest.raises(DataError, match="class index 7 is outside the dataset's 2 classes"):
            proc.submit(bad).result(timeout=60)
        expected = proc.submit(table).result(timeout=60)["mAP"]
        proc.child.kill()
        proc.child.wait()
        with caplog.at_level(logging.WARNING):
            got = proc.submit(table).result(timeout=60)
    finally:
        proc.close()
    assert got["mAP"] == expected
    assert "the scoring process failed" in caplog.text and "scores in the training process from now on" in caplog.text
    assert proc.local is not None
