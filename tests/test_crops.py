"""`rtmdet crops`: detection boxes as a classification dataset that load_class_folders reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtmdet.cli import main
from rtmdet.data.class_folders import load_class_folders
from rtmdet.data.coco import load_dataset
from rtmdet.data.crops import crop_box, write_crops
from rtmdet.errors import ConfigError, DataError
from rtmdet.imageio import read_image

from test_trainer import make_dataset


def test_crop_box_pads_and_clips():
    image = np.arange(100 * 80 * 3, dtype=np.uint8).reshape(100, 80, 3)
    assert crop_box(image, np.array([10.0, 20.0, 30.0, 60.0]), 0.1).shape == (48, 24, 3)  # 2 px / 4 px per side
    assert crop_box(image, np.array([0.0, 0.0, 80.0, 100.0]), 0.5).shape == (100, 80, 3)  # clipped to the image


def test_every_box_becomes_a_crop_of_its_class(tmp_path):
    root = make_dataset(tmp_path / "det", n_train=6, n_valid=3)
    dataset = load_dataset(root)
    summary = write_crops(dataset, tmp_path / "crops", pad=0.0, min_size=1)
    boxes = {s: sum(len(r.boxes) for r in dataset.splits[s].records) for s in ("train", "valid")}
    assert summary["splits"]["train"]["crops"] == boxes["train"] and summary["splits"]["val"]["crops"] == boxes["valid"]
    cls = load_class_folders(tmp_path / "crops")
    assert set(cls.classes) <= set(dataset.classes) and set(cls.splits) == {"train", "val"}
    # A crop holds its box's pixels (pad 0): the first train record's first box, re-read.
    rec = dataset.splits["train"].records[0]
    x1, y1, x2, y2 = rec.boxes[0]
    crop = read_image(tmp_path / "crops" / "train" / dataset.classes[rec.labels[0]] / f"{rec.image_id}_0.jpg")
    assert crop.shape[:2] == (int(np.ceil(y2)) - int(np.floor(y1)), int(np.ceil(x2)) - int(np.floor(x1)))
    assert json.loads((tmp_path / "crops" / "crops.json").read_text())["pad"] == 0.0


def test_rewriting_replaces_the_folder_and_bad_settings_fail(tmp_path):
    root = make_dataset(tmp_path / "det", n_train=4, n_valid=2)
    dataset = load_dataset(root)
    out = tmp_path / "crops"
    (out / "train" / "stale").mkdir(parents=True)
    write_crops(dataset, out)
    assert not (out / "train" / "stale").exists() and not list(tmp_path.glob(".crops.*"))
    with pytest.raises(ConfigError, match="pad must be >= 0"):
        write_crops(dataset, out, pad=-1)
    with pytest.raises(DataError, match="no crops from the train split"):
        write_crops(dataset, tmp_path / "none", min_size=10_000)
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none.*"))


def test_crops_command_on_facemask(facemask, tmp_path, capsys):
    assert main(["crops", str(facemask), "--out", str(tmp_path / "faces")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train: ") and "val: " in out
    cls = load_class_folders(tmp_path / "faces", check_images=False)
    assert len(cls.classes) >= 2 and len(cls.splits["train"].images) > 1000
