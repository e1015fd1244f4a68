"""The evaluate stage and `rtmdet evaluate`: every report file, sane content, atomic writes."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import random_detector_checkpoint
from rtmdet import cli
from rtmdet.data.coco import load_dataset
from rtmdet.errors import DataError
from rtmdet.evaluation import STAT_NAMES
from rtmdet.evaluation.stage import (
    METRICS_FILE,
    REPORT_DIR,
    evaluate_splits,
    run_evaluation,
    write_atomic,
    write_json_atomic,
)
from rtmdet.inference.detections import Detections

CLASSES = ("cat", "dog")
CATEGORY_IDS = (3, 7)  # not 0..C-1, so a results file with wrong ids would show
EXTRA_METRICS = ("precision_at_conf", "recall_at_conf", "f1_at_conf")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_split(folder: Path, images: list[tuple[str, int, int, list[tuple[int, list[float], int]]]]) -> None:
    """images: (file name, width, height, [(category id, xywh, iscrowd), ...]) in a Roboflow folder."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(images))
    coco = {"images": [], "annotations": [],
            "categories": [{"id": 0, "name": "animals", "supercategory": "none"},
                           {"id": 3, "name": "cat", "supercategory": "animals"},
                           {"id": 7, "name": "dog", "supercategory": "animals"}]}  # fmt: skip
    for image_id, (name, w, h, anns) in enumerate(images):
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        for cat, box, crowd in anns:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": cat, "bbox": box, "area": box[2] * box[3],
                                        "iscrowd": crowd})  # fmt: skip
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))


def make_dataset(root: Path, with_test: bool = True) -> Path:
    """A 3-image valid split (one image without boxes, one crowd box), 2 train, 2 test images."""
    _write_split(root / "train", [("t0.jpg", 96, 64, [(3, [10, 10, 30, 30], 0)]),
                                  ("t1.jpg", 80, 80, [(7, [20, 5, 40, 50], 0)])])  # fmt: skip
    _write_split(root / "valid", [
        ("v0.jpg", 96, 64, [(3, [10, 10, 30, 30], 0), (7, [50, 20, 30, 40], 0)]),
        ("v1.jpg", 64, 96, []),
        ("v2.jpg", 80, 80, [(7, [5, 5, 60, 60], 0), (3, [0, 0, 20, 20], 1)]),
    ])  # fmt: skip
    if with_test:
        _write_split(root / "test", [("s0.jpg", 96, 64, [(3, [40, 10, 30, 30], 0)]),
                                     ("s1.jpg", 64, 64, [(7, [8, 8, 40, 40], 0)])])  # fmt: skip
    return root


@pytest.fixture()
def dataset_root(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    return random_detector_checkpoint(tmp_path / "w.pt", classes=CLASSES, image_size=64,
                                      category_ids=list(CATEGORY_IDS))  # fmt: skip


def _strict_json(path: Path):
    """Parse JSON, failing on NaN / Infinity (which json.loads would otherwise accept)."""
    def no_constants(name):
        raise AssertionError(f"{path.name} holds {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


def _check_split_reports(out: Path, split: str, num_images: int) -> None:
    folder = out / REPORT_DIR
    results = _strict_json(folder / f"results_{split}.json")
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    rows = _strict_json(folder / f"per_class_{split}.json")
    assert [r["class"] for r in rows] == list(CLASSES)
    assert [r["category_id"] for r in rows] == list(CATEGORY_IDS)
    with open(folder / f"per_class_{split}.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["class"] for r in table] == list(CLASSES)
    assert set(table[0]) >= {"class", "num_gt", "AP", "AP50", "tp", "fp", "fn", "precision", "recall"}
    pr = _strict_json(folder / f"pr_{split}.json")
    assert pr and all(set(r) == {"class", "recall", "precision"} for r in pr)
    assert all(0.0 <= r["recall"] <= 1.0 and 0.0 <= r["precision"] <= 1.0 for r in pr)
    assert {r["class"] for r in pr} <= {*CLASSES, "all classes"}
    for name in ("pr", "confusion", "per_class_ap", "worst"):
        data = (folder / f"{name}_{split}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000, name
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


def _check_metrics(split_metrics: dict, num_images: int) -> None:
    assert set(STAT_NAMES) <= set(split_metrics)
    assert set(EXTRA_METRICS) <= set(split_metrics)
    assert {"AP/cat", "AP/dog", "AP50/cat", "AP50/dog"} <= set(split_metrics)
    assert split_metrics["num_images"] == num_images
    for value in split_metrics.values():
        assert value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def test_run_evaluation_writes_every_report(dataset_root, weights, tmp_path):
    out = tmp_path / "reports"
    results = run_evaluation(weights, dataset_root, out, grid_images=4, batch_size=2, progress=False)
    assert list(results) == ["valid", "test"]
    metrics = _strict_json(out / METRICS_FILE)
    assert list(metrics) == ["valid", "test"]
    _check_metrics(metrics["valid"], 3)
    _check_metrics(metrics["test"], 2)
    assert metrics["valid"]["mAP"] == results["valid"].stats["mAP"]
    _check_split_reports(out, "valid", 3)
    _check_split_reports(out, "test", 2)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_without_test_split_only_valid_is_scored(tmp_path, weights):
    root = make_dataset(tmp_path / "data", with_test=False)
    out = tmp_path / "reports"
    run_evaluation(weights, root, out, grid_images=2, progress=False)
    assert list(_strict_json(out / METRICS_FILE)) == ["valid"]
    assert not list((out / REPORT_DIR).glob("*_test.*"))
    with pytest.raises(DataError, match="no test split"):
        run_evaluation(weights, root, out, splits=("test",), progress=False)
    with pytest.raises(DataError, match="no test split"):
        run_evaluation(weights, root, out, splits=("valid", "test"), require_all=True, progress=False)


class EmptyDetector:
    """A model that predicts nothing."""

    class_names = list(CLASSES)

    def __call__(self, paths):
        return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                           self.class_names, (0, 0)) for _ in paths]  # fmt: skip


def test_a_model_that_predicts_nothing(dataset_root, tmp_path):
    dataset = load_dataset(dataset_root)
    out = tmp_path / "reports"
    results = evaluate_splits(EmptyDetector(), dataset, out, ["valid"], progress=False)
    assert results["valid"].results == []
    metrics = _strict_json(out / METRICS_FILE)["valid"]
    _check_metrics(metrics, 3)
    assert metrics["mAP"] == 0.0 and metrics["recall_at_conf"] == 0.0
    assert metrics["precision_at_conf"] is None  # no detections: undefined, written as null
    assert _strict_json(out / REPORT_DIR / "results_valid.json") == []
    _check_split_reports(out, "valid", 3)


def test_write_atomic_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "m.json"
    write_json_atomic(target, {"mAP": float("nan"), "n": np.int64(3)})
    assert json.loads(target.read_text()) == {"mAP": None, "n": 3}
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "half")
    assert json.loads(target.read_text()) == {"mAP": None, "n": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.json"]


# ---------------------------------------------------------------- rtmdet evaluate


@pytest.fixture()
def main(monkeypatch):
    """rtmdet.cli.main with the evaluate command registered (the lead adds it to COMMANDS)."""
    if "rtmdet.evaluation.command" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "rtmdet.evaluation.command"))
    return cli.main


SUMMARY_LINE = re.compile(r"^ Average (Precision|Recall) +\((AP|AR)\) @\[ IoU=.* \] = +(\d\.\d{3}|n/a)$")


def test_cli_prints_the_12_line_coco_table(main, dataset_root, weights, capsys):
    rc = main(["evaluate", "--weights", str(weights), "--data", str(dataset_root), "--no-progress"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:12] and all(SUMMARY_LINE.match(line) for line in lines[:12])
    assert lines[12] == ""
    assert lines[13].split() == ["class", "num_gt", "AP", "AP50"]
    assert [line.split()[0] for line in lines[14:16]] == list(CLASSES)


def test_cli_writes_reports_with_explicit_files(main, dataset_root, weights, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["evaluate", "--weights", str(weights), "--valid-ann", str(dataset_root / "valid/_annotations.coco.json"),
            "--train-ann", str(dataset_root / "train/_annotations.coco.json"), "--split", "val",
            "--out", str(out), "--conf-thr", "0.05", "--grid-images", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "Average Precision" in capsys.readouterr().out
    assert list(_strict_json(out / METRICS_FILE)) == ["valid"]
    _check_split_reports(out, "valid", 3)


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--split", "test", "--data", "{tmp}/data"], "no test split"),
        (["--data", "{tmp}/nothing"], "nothing: dataset folder not found"),
        (["--imgsz", "100", "--data", "{tmp}/data"], "--imgsz 100 is not a positive multiple of 32"),
        ([], "evaluate: give --data ROOT"),
    ],
)
def test_cli_errors_are_one_line(main, tmp_path, weights, capsys, extra, expected):
    make_dataset(tmp_path / "data", with_test=False)
    argv = ["evaluate", "--weights", str(weights), *[a.format(tmp=tmp_path) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
