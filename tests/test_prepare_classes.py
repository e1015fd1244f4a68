"""The prepare stage for model.task classify: class folders listed as they are, a detection
dataset cut into crops; the later stages read the listing back."""

from __future__ import annotations

import json

import pytest

from rtmdet.config import DataParams, ModelParams
from rtmdet.data.class_folders import load_class_folders
from rtmdet.data.prepare_classes import is_class_folders, load_prepared_classes, prepare_classes
from rtmdet.data.synthetic import make_synthetic_dataset
from rtmdet.errors import DataError
from rtmdet.training.tasks import train_task
from test_train_classify import make_colors


def test_class_folders_are_listed_and_read_back(tmp_path):
    root = make_colors(tmp_path / "colors", train=3, val=2)
    assert is_class_folders(root)
    stats = prepare_classes(DataParams(root=str(root)), tmp_path / "prepared")
    assert stats["splits"]["train"]["images"] == 9 and stats["source"].startswith("class folders")
    back = load_prepared_classes(tmp_path / "prepared")
    direct = load_class_folders(root)
    assert back.classes == direct.classes
    for name in ("train", "val"):
        assert [(im.file, im.label) for im in back.splits[name].images] == \
               [(im.file, im.label) for im in direct.splits[name].images]


def test_a_detection_dataset_becomes_its_box_crops(tmp_path):
    make_synthetic_dataset(tmp_path / "shapes", 0, train=6, valid=3)
    assert not is_class_folders(tmp_path / "shapes")
    out = tmp_path / "prepared"
    train_task("classify").parts.prepare(DataParams(root=str(tmp_path / "shapes")), ModelParams(task="classify"),
                                         False, out, tmp_path / "reports")
    index = json.loads((out / "classes.json").read_text())
    boxes = sum(len(a["bbox"]) > 0 for a in json.loads(
        (tmp_path / "shapes" / "train" / "_annotations.coco.json").read_text())["annotations"])
    dataset = load_prepared_classes(out)
    assert index["source"].startswith("box crops") and len(dataset.splits["train"].images) <= boxes
    assert len(dataset.splits["train"].images) >= 0.9 * boxes  # only boxes under 8 px are left out
    assert json.loads((tmp_path / "reports" / "stats.json").read_text())["classes"] == dataset.classes


def test_missing_listing_or_images_are_one_line(tmp_path):
    with pytest.raises(DataError, match="prepared classification dataset not found"):
        load_prepared_classes(tmp_path)
    root = make_colors(tmp_path / "colors", train=2, val=1)
    prepare_classes(DataParams(root=str(root)), tmp_path / "prepared")
    (root / "val" / "red" / "0.png").unlink()
    with pytest.raises(DataError, match="listed by .*classes.json but gone"):
        load_prepared_classes(tmp_path / "prepared")
    with pytest.raises(DataError, match="data.num_classes is 5 but"):
        prepare_classes(DataParams(root=str(root), num_classes=5), tmp_path / "p2")
