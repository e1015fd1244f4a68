"""Class-folder classification datasets: what is read, and each problem as one clear line or a count."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from rtmdet.data.class_folders import load_class_folders, summarize
from rtmdet.errors import DataError


def _image(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((20, 24, 3), value, np.uint8))
    return path


def make_folders(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """layout: split -> class -> number of images (0: an empty class folder)."""
    for split, classes in layout.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(root / split / name / f"{i}.jpg", 10 * i)
    return root


def test_reads_classes_in_folder_order_with_valid_as_val(tmp_path):
    root = make_folders(tmp_path, {"train": {"dog": 3, "cat": 2}, "valid": {"cat": 1, "dog": 1}})
    ds = load_class_folders(root)
    assert ds.classes == ["cat", "dog"] and set(ds.splits) == {"train", "val"}
    assert summarize(ds)["splits"]["train"]["per_class"] == {"cat": 2, "dog": 3}
    assert [im.label for im in ds.splits["val"].images] == [0, 1]
    assert all(im.file.is_absolute() and im.file.exists() for im in ds.splits["train"].images)


def test_skips_what_can_be_skipped_and_counts_it(tmp_path, caplog):
    root = make_folders(tmp_path, {"train": {"cat": 2, "dog": 2, "owl": 0}, "val": {"cat": 1, "owl": 0}})
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    _image(root / "train" / "stray.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        ds = load_class_folders(root)
    assert ds.classes == ["cat", "dog"]  # owl has no training images: left out, counted
    train = ds.splits["train"]
    assert dict(train.warnings) == {"empty_class": 1, "loose_images": 1, "unreadable_image": 1}
    assert len(train.images) == 4
    assert any("broken.jpg" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("layout,message", [
    (None, "dataset folder not found"),
    ({"val": {"cat": 1}}, "no train/ folder"),
    ({"train": {"cat": 2}}, "1 class folder\\(s\\) with images; a classifier needs 2"),
    ({"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "eel": 2}}, "class 'eel' has 2 image\\(s\\) in val/ but no images in train/"),
    ({"train": {"cat": 1, "dog": 1}, "test": {"cat": 0}}, "the test split has no usable images"),
    ({"train": {"cat": 1, "dog": 1}, "val": {"cat": 1}, "valid": {"cat": 1}}, "both val/ and valid/ exist"),
])
def test_unusable_data_is_one_line_naming_the_folder(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout is not None:
        make_folders(root, layout)
    with pytest.raises(DataError, match=message) as info:
        load_class_folders(root)
    assert "\n" not in str(info.value) and str(root) in str(info.value)
