"""DOTA-layout rotated-box datasets: what is read, and each problem as one line or a count."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rtmdet.data.dota import load_dota
from rtmdet.errors import DataError
from rtmdet.geometry.rotated import rbox_to_corners, rotated_iou


def _quad(cx, cy, w, h, a):
    return rbox_to_corners(torch.tensor([cx, cy, w, h, a], dtype=torch.float64)).numpy().reshape(-1)


def make_dota(root: Path, split: str, images: dict[str, list[str] | None], size=(200, 120)) -> Path:
    """images: stem -> label lines (None: no label file)."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "labelTxt").mkdir(parents=True, exist_ok=True)
    for stem, lines in images.items():
        cv2.imwrite(str(root / split / "images" / f"{stem}.png"), np.zeros((size[1], size[0], 3), np.uint8))
        if lines is not None:
            (root / split / "labelTxt" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


def _line(quad, name="plane", difficult=0):
    return " ".join(f"{v:.3f}" for v in quad) + f" {name} {difficult}"


def test_reads_rotated_boxes_classes_and_difficult(tmp_path):
    box = (60.0, 50.0, 40.0, 10.0, 0.6)
    root = make_dota(tmp_path, "train", {
        "a": ["imagesource:GoogleEarth", "gsd:0.15", _line(_quad(*box)), _line(_quad(100, 60, 20, 20, 0.0), "ship", 1)],
        "b": [_line(_quad(30, 30, 10, 30, -1.0), "ship")],
    })
    make_dota(root, "val", {"c": [_line(_quad(50, 50, 10, 10, 0.2), "plane")]})
    ds = load_dota(root)
    assert ds.classes == ["plane", "ship"] and set(ds.splits) == {"train", "val"}
    a = ds.splits["train"].records[0]
    assert (a.width, a.height) == (200, 120) and a.labels.tolist() == [0, 1] and a.difficult.tolist() == [False, True]
    iou = rotated_iou(torch.from_numpy(a.rboxes[:1]).double(), torch.tensor([box], dtype=torch.float64), aligned=True)
    assert float(iou) > 0.999 and -math.pi / 2 <= a.rboxes[0, 4] < math.pi / 2
    assert not ds.splits["train"].warnings


def test_counts_what_it_changes_or_skips(tmp_path):
    kite = "10 10 50 10 60 40 10 30 plane 0"  # not a rectangle
    root = make_dota(tmp_path, "train", {
        "a": [kite, _line(_quad(195, 60, 30, 10, 0.0)), _line(_quad(500, 500, 10, 10, 0.0)),
              "5 5 5 5 5 5 5 5 plane 0"],
        "empty": [], "unlabelled": None,
    })
    (root / "train" / "labelTxt" / "orphan.txt").write_text(_line(_quad(5, 5, 4, 4, 0.0)))
    ds = load_dota(root)
    train = ds.splits["train"]
    assert dict(train.warnings) == {"non_rectangular": 1, "partly_outside": 1, "outside": 1, "degenerate": 1,
                                    "background_image": 2, "label_without_image": 1}
    assert len(train.records[0].rboxes) == 2 and len(train.records) == 3


@pytest.mark.parametrize("lines,message", [
    (["1 2 3 4 5 6 7 plane"], r"a\.txt:1: expected 'x1 y1 .*got 8 fields"),
    (["imagesource:x", "1 2 3 4 5 6 7 eight plane 0"], r"a\.txt:2: the 8 corner coordinates"),
    (["1 2 3 4 5 6 7 nan plane 0"], r"a\.txt:1: a corner coordinate is not finite"),
])
def test_malformed_lines_name_file_and_line(tmp_path, lines, message):
    root = make_dota(tmp_path, "train", {"a": lines})
    with pytest.raises(DataError, match=message):
        load_dota(root)


def test_unknown_category_and_missing_folders(tmp_path):
    root = make_dota(tmp_path / "d", "train", {"a": [_line(_quad(50, 50, 10, 10, 0.0))]})
    make_dota(root, "val", {"b": [_line(_quad(50, 50, 10, 10, 0.0), "tank")]})
    with pytest.raises(DataError, match=r"b\.txt:1: unknown category 'tank' \(classes: plane\)"):
        load_dota(root)
    with pytest.raises(DataError, match="no train/ folder"):
        load_dota(tmp_path / "d" / "val")
    with pytest.raises(DataError, match="dataset folder not found"):
        load_dota(tmp_path / "nothing")
    (root / "val" / "images" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b\.png: not a readable image"):
        load_dota(root, classes=["plane", "tank"])
