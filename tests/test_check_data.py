"""`rtmdet check-data`: the report, --json, the explicit layout, and errors as one line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from rtmdet.data import check
from rtmdet.data.coco import load_dataset, summarize
from rtmdet.errors import ConfigError, DataError

FACEMASK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "facemask"
ANN = "_annotations.coco.json"


def parser() -> argparse.ArgumentParser:
    """The way cli.py mounts the sub-command."""
    top = argparse.ArgumentParser(prog="rtmdet")
    check.add_parser(top.add_subparsers(dest="command", required=True))
    return top


def check_data(*argv: str) -> int:
    args = parser().parse_args(["check-data", *map(str, argv)])
    return args.func(args)


def write_split(folder: Path, n_images: int, boxes: list[tuple[int, int]], missing: int = 0) -> None:
    """n_images 64x48 images (the last `missing` not written) and boxes as (image_id, category_id)."""
    folder.mkdir(parents=True)
    images = [{"id": i, "file_name": f"im{i}.png", "width": 64, "height": 48} for i in range(n_images)]
    for entry in images[: n_images - missing]:
        cv2.imwrite(str(folder / entry["file_name"]), np.zeros((48, 64, 3), np.uint8))
    anns = [{"id": k, "image_id": i, "category_id": c, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}
            for k, (i, c) in enumerate(boxes)]
    cats = [{"id": 0, "name": "things", "supercategory": "none"},
            {"id": 1, "name": "a", "supercategory": "things"},
            {"id": 2, "name": "b", "supercategory": "things"}]
    (folder / ANN).write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.fixture
def export(tmp_path) -> Path:
    root = tmp_path / "export"
    write_split(root / "train", 4, [(0, 1), (1, 1), (1, 2), (3, 1)], missing=1)
    write_split(root / "valid", 2, [(0, 1), (1, 2)])
    return root


@pytest.mark.skipif(not FACEMASK.is_dir(), reason="shared facemask dataset not present")
def test_facemask_report(capsys):
    assert check_data(FACEMASK) == 0
    out = capsys.readouterr().out
    assert "classes (3): mask_weared_incorrect, with_mask, without_mask" in out
    assert "train: 677 images, 3106 boxes" in out and "valid: 171 images, 915 boxes" in out
    assert "warning " not in out and out.count("no warnings") == 2


@pytest.mark.skipif(not FACEMASK.is_dir(), reason="shared facemask dataset not present")
def test_facemask_json(capsys):
    assert check_data(FACEMASK, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["classes"]) == 3
    assert {n: (s["images"], s["boxes"], s["warnings"]) for n, s in report["splits"].items()} == {
        "train": (677, 3106, {}), "valid": (171, 915, {})}


def test_report_shows_counts_warnings_and_notes(export, capsys):
    assert check_data(export) == 0
    out = capsys.readouterr().out
    assert "classes (2): a, b" in out
    assert "train: 3 images, 3 boxes" in out
    assert "warning missing_image: 1" in out
    assert 'note: category id 0 "things" has no boxes' in out
    assert "usable, with 1 skipped or changed items" in out


def test_json_is_exactly_summarize(export, capsys):
    assert check_data(export, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report == summarize(load_dataset(export))
    assert report["splits"]["train"]["per_class"] == {"a": 2, "b": 1}
    assert report["splits"]["train"]["warnings"] == {"missing_image": 1}


def test_explicit_split_files(export, capsys):
    assert check_data("--train-ann", export / "train" / ANN, "--train-img", export / "train",
                      "--valid-ann", export / "valid" / ANN, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["splits"]) == ["train", "valid"]
    # Relative to ROOT, with the image folder defaulting to the annotation file's folder.
    assert check_data(export, "--train-ann", "train/" + ANN, "--valid-ann", "valid/" + ANN, "--json") == 0
    assert json.loads(capsys.readouterr().out) == report


def test_no_images_checks_json_only(export, capsys):
    assert check_data(export, "--no-images", "--json") == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["images"] == 4


def test_unusable_data_raises_one_line_error(export):
    (export / "valid" / ANN).write_text('{"images": [}')
    with pytest.raises(DataError) as info:
        check_data(export)
    message = str(info.value)
    assert str(export / "valid" / ANN) in message and "invalid JSON at line 1 column 13" in message
    assert "\n" not in message


def test_bad_arguments(export):
    with pytest.raises(ConfigError, match="--train-img needs --train-ann"):
        check_data("--train-img", export / "train")
    with pytest.raises(ConfigError, match="give a dataset folder"):
        check_data()
    with pytest.raises(ConfigError, match="at least --train-ann"):
        check_data("--valid-ann", export / "valid" / ANN)


def test_class_folder_and_dota_layouts_are_recognized(tmp_path, capsys):
    from test_class_folders import make_folders
    from test_dota import _line, _quad, make_dota

    classes = make_folders(tmp_path / "cls", {"train": {"cat": 2, "dog": 1}, "valid": {"cat": 1}})
    assert check_data(classes) == 0
    out = capsys.readouterr().out
    assert out.startswith("classes layout; classes (2): cat, dog") and "train: 3 images" in out
    rotated = make_dota(tmp_path / "dota", "train", {"a": [_line(_quad(50, 50, 20, 10, 0.3), "ship", 1)]})
    assert check_data(rotated, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "dota" and report["splits"]["train"]["difficult"] == 1
    with pytest.raises(DataError, match="no train/ folder"):
        check_data(tmp_path / "cls" / "valid", "--layout", "classes")
