"""COCO scoring in a process of its own, so validation during training costs the GPU part only.

COCOeval (faster-coco-eval) is CPU work, half of it Python: in a thread of the training process it
holds the GIL and slows the next epoch by as much as it saves (measured: an H200 epoch of 0.3 s took
0.7 s beside a scoring thread). `ScoreProcess` starts `python -m rtmdet.evaluation.score_process`
once per run, hands it the ground truth, then one detection table per validation; the answer comes
back through a pipe, read by a thread that only waits. The child ends when the pipe closes, so a
killed trainer leaves no scorer behind; a child that fails is replaced by scoring in-process, with
one warning line.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from rtmdet.errors import first_line
from rtmdet.evaluation.coco_eval import CocoScorer

log = logging.getLogger(__name__)


def score_table(scorer: CocoScorer, ids: np.ndarray, table: np.ndarray, rles: list[dict] | None = None,
                mask_scorer: CocoScorer | None = None) -> dict[str, Any]:
    """Metrics of a validation table [x1, y1, x2, y2, score, label, image index] (EvalResult.to_metrics)
    plus `scoring_s`, the seconds it took; with a segm `mask_scorer` and each row's RLE mask, the
    mask metrics too, as mask_<name> (mask_mAP, mask_AP/<class>, ...)."""
    start = time.perf_counter()
    image_ids = ids[table[:, 6].astype(np.int64)]
    columns = (image_ids, table[:, :4], table[:, 4], table[:, 5].astype(np.int64))
    metrics = scorer.score_arrays(*columns).to_metrics()
    if mask_scorer is not None:
        masks = mask_scorer.score_arrays(*columns, rles=rles).to_metrics()
        metrics.update({f"mask_{k}": v for k, v in masks.items() if k not in ("images_per_s", "num_images")})
    metrics["scoring_s"] = time.perf_counter() - start
    return metrics


def make_scorers(gt: dict[str, Any], classes: list[str], category_ids: list[int],
                 masks: bool) -> tuple[CocoScorer, CocoScorer | None]:
    """The box scorer, and the mask (segm) scorer when `masks`."""
    return CocoScorer(gt, classes, category_ids), CocoScorer(gt, classes, category_ids, "segm") if masks else None


class ScoreProcess:
    """Scores validation tables in a child process, one at a time; `submit` returns a Future of
    `score_table`'s metrics."""

    def __init__(self, gt: dict[str, Any], classes: list[str], category_ids: list[int], ids: list[int],
                 masks: bool = False):
        """ids: the image id of each table row's image index (the split's order); masks: score
        the tables' RLE masks too (segm; the ground truth carries segmentations)."""
        self.setup = (gt, list(classes), [int(c) for c in category_ids], np.asarray(ids, np.int64), masks)
        self.local: tuple[CocoScorer, CocoScorer | None] | None = None  # the fallback: scoring in this process
        self.lock = threading.Lock()
        self.child: subprocess.Popen | None = None
        try:
            self._start()
        except OSError as exc:
            self._fall_back(exc)

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # where this rtmdet package lives
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.child = subprocess.Popen([sys.executable, "-m", "rtmdet.evaluation.score_process"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, start_new_session=False)
        pickle.dump(self.setup, self.child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.child.stdin.flush()

    def _fall_back(self, exc: BaseException) -> None:
        log.warning("the scoring process failed (%s); validation scores in the training process from now on",
                    first_line(exc, 160))
        self.close()
        gt, classes, category_ids, _, masks = self.setup
        self.local = make_scorers(gt, classes, category_ids, masks)

    def submit(self, table: np.ndarray, rles: list[dict] | None = None) -> Future:
        """Score a table (and its rows' RLE masks, scoring masks) in the child."""
        future: Future = Future()
        threading.Thread(target=self._run, args=((table, rles), future), name="rtmdet-scoring", daemon=True).start()
        return future

    def _run(self, payload: tuple, future: Future) -> None:
        with self.lock:  # one table at a time through the pipe
            try:
                future.set_result(self._score(payload))
            except BaseException as exc:  # noqa: BLE001 - the trainer sees it at result()
                future.set_exception(exc)

    def _score(self, payload: tuple) -> dict[str, Any]:
        if self.local is None:
            try:
                pickle.dump(payload, self.child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.child.stdin.flush()
                answer = pickle.load(self.child.stdout)
                if isinstance(answer, BaseException):
                    raise answer
                return answer
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                self._fall_back(exc)
        table, rles = payload
        return score_table(self.local[0], self.setup[3], table, rles, self.local[1])

    def close(self) -> None:
        if self.child is None:
            return
        child, self.child = self.child, None
        try:
            child.stdin.close()
        except OSError:
            pass
        try:
            child.wait(timeout=5)  # a process forked since holds the pipe open: then end it
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _serve() -> None:
    """The child: ground truth first, then a table per request; answers metrics (or the exception)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the answer pipe
    gt, classes, category_ids, ids, masks = pickle.load(stdin)
    scorer, mask_scorer = make_scorers(gt, classes, category_ids, masks)
    while True:
        try:
            table, rles = pickle.load(stdin)
        except EOFError:  # the trainer closed the pipe, or died
            return
        try:
            answer: Any = score_table(scorer, ids, table, rles, mask_scorer)
        except Exception as exc:  # noqa: BLE001 - sent back, raised in the trainer
            answer = exc
        pickle.dump(answer, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    _serve()
