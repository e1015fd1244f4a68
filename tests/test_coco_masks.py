"""Instance masks read from COCO / Roboflow files (load_dataset(masks=True)) and decoded with the
image (load_record): polygons, compressed and uncompressed RLE, and the flaws users' exports have."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from rtmdet.data.coco import load_dataset
from rtmdet.data.loader import load_record
from rtmdet.errors import DataError

W, H = 96, 80


def _shapes() -> list[np.ndarray]:
    """Three drawn instance masks of one image: an ellipse, a triangle, a square."""
    out = []
    m = np.zeros((H, W), np.uint8)
    cv2.ellipse(m, (25, 25), (15, 10), 0, 0, 360, 1, -1)
    out.append(m.astype(bool))
    m = np.zeros((H, W), np.uint8)
    cv2.fillPoly(m, [np.array([[50, 70], [90, 70], [70, 40]], np.int32)], 1)
    out.append(m.astype(bool))
    m = np.zeros((H, W), bool)
    m[50:72, 8:30] = True
    out.append(m)
    return out


def _polygon(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(float).tolist() for c in contours]


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _write(root: Path, valid_anns: list[dict] | None = None) -> Path:
    """train: one image, its 3 shapes as polygon, compressed RLE, uncompressed RLE, plus a box with
    a degenerate polygon and a box without segmentation; valid: one image, one polygon."""
    shapes = _shapes()
    rle = mask_utils.encode(np.asfortranarray(shapes[1].astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    flat = shapes[2].astype(np.uint8).flatten(order="F")
    runs, value, n = [], 0, 0
    for v in flat:  # uncompressed RLE: run lengths, starting with zeros
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    train = [
        {"id": 1, "image_id": 0, "category_id": 1, "bbox": _bbox(shapes[0]), "segmentation": _polygon(shapes[0])},
        {"id": 2, "image_id": 0, "category_id": 2, "bbox": _bbox(shapes[1]), "segmentation": rle},
        {"id": 3, "image_id": 0, "category_id": 1, "bbox": _bbox(shapes[2]), "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": runs}},
        {"id": 4, "image_id": 0, "category_id": 2, "bbox": [60, 5, 20, 20], "segmentation": [[60, 5, 70, 5]]},
        {"id": 5, "image_id": 0, "category_id": 1, "bbox": [40, 5, 10, 10]},
    ]
    valid = valid_anns or [{"id": 1, "image_id": 0, "category_id": 1, "bbox": _bbox(shapes[0]),
                            "segmentation": _polygon(shapes[0])}]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    for split, anns in (("train", train), ("valid", valid)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        image = np.full((H, W, 3), 90, np.uint8)
        for m in shapes:
            image[m] = 200
        cv2.imwrite(str(folder / "0.png"), image)
        (folder / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": 0, "file_name": "0.png", "width": W, "height": H}], "annotations": anns,
            "categories": cats}))
    return root


def test_polygons_and_both_rles_decode_onto_their_shapes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _write(tmp_path / "d")
    ds = load_dataset(root, masks=True)
    split = ds.splits["train"]
    record = split.records[0]
    assert len(record.boxes) == 3 and len(record.segmentations) == 3  # two boxes without a usable mask dropped
    assert split.warnings["no_mask"] == 2 and split.warnings["degenerate_polygon"] == 1
    assert "annotation id 4 on image id 0" in caplog.text and "no usable segmentation (instance dropped)" in caplog.text
    sample = load_record(record)
    assert sample.masks.shape == (3, H, W) and sample.masks.dtype == bool
    for got, want in zip(sample.masks, _shapes()):
        iou = (got & want).sum() / (got | want).sum()
        assert iou > 0.9, iou  # polygons from contours lose a pixel row at edges; RLEs are exact
    assert np.array_equal(sample.masks[1], _shapes()[1]) and np.array_equal(sample.masks[2], _shapes()[2])


def test_without_masks_nothing_changes(tmp_path: Path) -> None:
    ds = load_dataset(_write(tmp_path / "d"))
    record = ds.splits["train"].records[0]
    assert len(record.boxes) == 5 and record.segmentations is None
    assert load_record(record).masks is None


def test_a_segmentation_of_the_wrong_kind_is_one_line_naming_file_and_annotation(tmp_path: Path) -> None:
    bad = [{"id": 7, "image_id": 0, "category_id": 1, "bbox": [1, 1, 10, 10], "segmentation": "polygon"}]
    root = _write(tmp_path / "d", valid_anns=bad)
    with pytest.raises(DataError) as err:
        load_dataset(root, masks=True)
    text = str(err.value)
    assert "\n" not in text and "valid/_annotations.coco.json" in text and "annotation id 7 on image id 0" in text
    assert "segmentation must be polygons" in text
    other = [{"id": 7, "image_id": 0, "category_id": 1, "bbox": [1, 1, 10, 10],
              "segmentation": {"size": [H + 1, W], "counts": "abc"}}]
    with pytest.raises(DataError, match=f"an RLE segmentation of size {H + 1}x{W} on an image of {H}x{W}"):
        load_dataset(_write(tmp_path / "e", valid_anns=other), masks=True)
