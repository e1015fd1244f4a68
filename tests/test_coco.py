"""The COCO / Roboflow reader: layouts, classes, every error and every counted warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from rtmdet.data.coco import load_dataset, summarize
from rtmdet.data.validate import raw_to_oriented
from rtmdet.errors import DataError
from rtmdet.imageio import read_image

FACEMASK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "facemask"
ANN = "_annotations.coco.json"

# Roboflow style: id 0 is the project's supercategory and has no boxes.
CATEGORIES = [
    {"id": 0, "name": "animals", "supercategory": "none"},
    {"id": 1, "name": "cat", "supercategory": "animals"},
    {"id": 2, "name": "dog", "supercategory": "animals"},
]


def image(image_id: int, width: int = 64, height: int = 48, name: str | None = None) -> dict:
    return {"id": image_id, "file_name": name or f"img{image_id}.jpg", "width": width, "height": height}


def box(ann_id: int, image_id: int, bbox=(4, 4, 20, 10), cat: int = 1, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": list(bbox),
            "area": bbox[2] * bbox[3], "iscrowd": 0, "segmentation": [], **extra}


def write_image(path: Path, width: int = 64, height: int = 48) -> None:
    pixels = np.full((height, width, 3), 90, np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = (20, 200, 60)
    ok, encoded = cv2.imencode(path.suffix, pixels)
    assert ok
    encoded.tofile(str(path))  # tofile keeps non-ASCII names working


def write_split(folder: Path, images: list[dict], annotations: list[dict],
                categories: list[dict] = CATEGORIES, skip_files: tuple[str, ...] = ()) -> Path:
    """Write a split's JSON and an image file for each entry except those in skip_files."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in images:
        if entry["file_name"] not in skip_files:
            write_image(folder / entry["file_name"], entry["width"], entry["height"])
    data = {"info": {"description": "test"}, "licenses": [], "categories": categories,
            "images": images, "annotations": annotations}
    (folder / ANN).write_text(json.dumps(data), encoding="utf-8")
    return folder / ANN


def make_export(root: Path) -> Path:
    """A clean Roboflow export: cat in both splits, dog with a single box, one negative image."""
    write_split(root / "train", [image(0), image(1), image(2)],
                [box(0, 0), box(1, 0, (30, 20, 10, 10)), box(2, 1, cat=2)])
    write_split(root / "valid", [image(0), image(1)], [box(0, 0), box(1, 1)])
    return root


def edit(ann_file: Path, change) -> None:
    data = json.loads(ann_file.read_text(encoding="utf-8"))
    change(data)
    ann_file.write_text(json.dumps(data), encoding="utf-8")


def raises(root_or_splits, *needles: str, **kwargs) -> str:
    """Load, expect a one-line DataError containing every needle; return the message."""
    with pytest.raises(DataError) as info:
        if isinstance(root_or_splits, dict):
            load_dataset(splits=root_or_splits, **kwargs)
        else:
            load_dataset(root_or_splits, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not FACEMASK.is_dir(), reason="shared facemask dataset not present")
def test_facemask_counts_classes_and_no_warnings():
    dataset = load_dataset(FACEMASK)
    summary = summarize(dataset)
    assert summary["classes"] == ["mask_weared_incorrect", "with_mask", "without_mask"]
    assert dataset.category_ids == [0, 1, 2]
    assert summary["splits"]["train"]["images"] == 677
    assert summary["splits"]["valid"]["images"] == 171
    assert summary["splits"]["train"]["boxes"] == 3106
    assert summary["splits"]["valid"]["boxes"] == 915
    assert all(s["warnings"] == {} for s in summary["splits"].values())
    assert set(summary["splits"]) == {"train", "valid"}


# ----------------------------------------------------------------------------- the must-show export


def test_roboflow_export_with_supercategory_single_box_class_and_missing_image(tmp_path, caplog):
    root = tmp_path / "export"
    write_split(root / "train", [image(0), image(1), image(2), image(3)],
                [box(0, 0), box(1, 1), box(2, 1, (30, 20, 8, 8), cat=2), box(3, 3)],
                skip_files=("img3.jpg",))
    write_split(root / "valid", [image(0), image(1)], [box(0, 0), box(1, 1)])
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(root)
    assert dataset.classes == ["cat", "dog"]
    assert dataset.category_ids == [1, 2]
    assert len(dataset.notes) == 1 and '"animals"' in dataset.notes[0] and "id 0" in dataset.notes[0]
    train = dataset.splits["train"]
    assert dict(train.warnings) == {"missing_image": 1}
    assert dict(dataset.splits["valid"].warnings) == {}
    summary = summarize(dataset)
    assert summary["splits"]["train"] == {
        "images": 3, "boxes": 3, "per_class": {"cat": 2, "dog": 1}, "crowd_boxes": 0,
        "images_without_boxes": 1, "warnings": {"missing_image": 1}}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(root / "train" / ANN) in warnings[0] and "img3.jpg" in warnings[0]
    assert "missing on disk" in warnings[0] and "with 1 boxes" in warnings[0]
    # Labels are contiguous, the image without boxes is kept as a negative.
    by_id = {r.image_id: r for r in train.records}
    assert by_id[1].labels.tolist() == [0, 1]
    assert by_id[2].boxes.shape == (0, 4)
    np.testing.assert_allclose(by_id[1].boxes[1], [30, 20, 38, 28])
    assert by_id[0].file.is_absolute() and by_id[0].file.name == "img0.jpg"


# ----------------------------------------------------------------------------- layouts


def test_val_alias_test_split_and_labels_shared(tmp_path):
    root = tmp_path / "d"
    write_split(root / "train", [image(0)], [box(0, 0)])
    write_split(root / "val", [image(5)], [box(0, 5, cat=2)])
    write_split(root / "test", [image(0)], [])
    dataset = load_dataset(root)
    assert list(dataset.splits) == ["train", "valid", "test"]
    assert dataset.classes == ["cat", "dog"]
    assert dataset.splits["valid"].records[0].labels.tolist() == [1]
    assert dataset.splits["valid"].img_dir == (root / "val").absolute()


def test_explicit_layout_relative_to_root(tmp_path):
    # mmdetection style: annotations/ beside image folders, file names relative to img_prefix.
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    for split, ids in (("train", [0, 1]), ("val", [7])):
        ann = write_split(tmp_path / f"{split}2017", [image(i) for i in ids], [box(i, i) for i in ids])
        ann.rename(ann_dir / f"instances_{split}2017.json")
    splits = {"train": ("annotations/instances_train2017.json", "train2017"),
              "val": ("annotations/instances_val2017.json", "val2017")}
    dataset = load_dataset(tmp_path, splits=splits)
    assert list(dataset.splits) == ["train", "valid"]
    assert len(dataset.splits["train"].records) == 2
    # The same layout is found from the root alone.
    found = load_dataset(tmp_path)
    assert {n: len(s.records) for n, s in found.splits.items()} == {"train": 2, "valid": 1}


def test_file_name_with_folder_prefix_or_backslashes(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["images"][0].update(file_name="train\\img0.jpg"))
    edit(root / "train" / ANN, lambda d: d["images"][1].update(file_name="export/train/img1.jpg"))
    dataset = load_dataset(root)
    assert [r.file.name for r in dataset.splits["train"].records] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert dataset.splits["train"].warnings == {}


def test_crowd_boxes_kept_out_of_targets_and_areas(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["annotations"].extend([
        box(10, 2, (1, 1, 30, 30), iscrowd=1),
        {"id": 11, "image_id": 2, "category_id": 1, "bbox": [40, 30, 10, 5]},  # no area, no iscrowd
    ]))
    record = load_dataset(root).splits["train"].records[2]
    np.testing.assert_allclose(record.crowd_boxes, [[1, 1, 31, 31]])
    np.testing.assert_allclose(record.boxes, [[40, 30, 50, 35]])
    np.testing.assert_allclose(record.areas, [50.0])
    first = load_dataset(root).splits["train"].records[0]
    np.testing.assert_allclose(first.areas, [200.0, 100.0])  # the user's own "area"


def test_category_with_only_a_crowd_box_is_a_class(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "valid" / ANN, lambda d: d["annotations"].append(box(9, 0, cat=0, iscrowd=1)))
    dataset = load_dataset(root)
    assert dataset.classes == ["animals", "cat", "dog"] and dataset.notes == []
    assert summarize(dataset)["splits"]["valid"]["crowd_boxes"] == 1


def test_sizes_optional_when_images_are_opened(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: [im.pop("width") for im in d["images"]])
    record = load_dataset(root).splits["train"].records[0]
    assert (record.width, record.height) == (64, 48)
    raises(root, str(root / "train" / ANN), 'image id 0 has no "width" key', check_images=False)


def test_check_images_off_trusts_json(tmp_path):
    root = make_export(tmp_path / "d")
    (root / "train" / "img1.jpg").unlink()
    dataset = load_dataset(root, check_images=False)
    assert len(dataset.splits["train"].records) == 3 and dataset.splits["train"].warnings == {}


# ----------------------------------------------------------------------------- image formats


@pytest.mark.parametrize("name,channels", [
    ("a.png", 3), ("b.bmp", 3), ("c.webp", 3), ("gray.png", 1), ("rgba.png", 4), ("gray.jpg", 1),
    ("маска 猫 ü.jpg", 3), ("Ω.PNG", 4),
])
def test_formats_grayscale_rgba_and_unicode_names(tmp_path, name, channels):
    root = make_export(tmp_path / "d")
    shape = (30, 50) if channels == 1 else (30, 50, channels)
    pixels = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    ok, encoded = cv2.imencode(Path(name).suffix, pixels)
    assert ok
    encoded.tofile(str(root / "train" / name))
    edit(root / "train" / ANN, lambda d: (d["images"].append(image(9, 50, 30, name)),
                                          d["annotations"].append(box(9, 9))))
    split = load_dataset(root).splits["train"]
    assert split.warnings == {}
    record = split.records[-1]
    assert record.file.name == name and (record.width, record.height) == (50, 30)
    assert read_image(record.file).shape == (30, 50, 3)


def write_exif_image(path: Path, orientation: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An 80x40 stored image with a white rectangle and an EXIF orientation tag."""
    stored = np.zeros((40, 80, 3), np.uint8)
    rect = (10, 5, 30, 15)  # x1, y1, x2, y2 on the stored pixels
    stored[rect[1]:rect[3], rect[0]:rect[2]] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return stored, rect


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_exif_rotated_boxes_follow_the_pixels(tmp_path, caplog, orientation):
    root = make_export(tmp_path / "d")
    _, rect = write_exif_image(root / "train" / "phone.jpg", orientation)
    x1, y1, x2, y2 = rect
    # Annotated on the stored pixels, so the JSON has the stored size 80x40.
    edit(root / "train" / ANN, lambda d: (d["images"].append(image(9, 80, 40, "phone.jpg")),
                                          d["annotations"].append(box(9, 9, (x1, y1, x2 - x1, y2 - y1)))))
    with caplog.at_level(logging.WARNING):
        split = load_dataset(root).splits["train"]
    assert dict(split.warnings) == {"exif_rotated": 1}
    assert any("exif" in r.getMessage().lower() and "phone.jpg" in r.getMessage() for r in caplog.records)
    record = split.records[-1]
    decoded = read_image(record.file)
    assert decoded.shape[:2] == (record.height, record.width) == (80, 40)
    bx1, by1, bx2, by2 = record.boxes[0].astype(int)
    ys, xs = np.nonzero(decoded[..., 0] > 128)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (bx1, by1, bx2, by2)


def test_exif_json_size_already_oriented_is_fine(tmp_path):
    root = make_export(tmp_path / "d")
    write_exif_image(root / "train" / "phone.jpg", 6)
    edit(root / "train" / ANN, lambda d: (d["images"].append(image(9, 40, 80, "phone.jpg")),
                                          d["annotations"].append(box(9, 9, (5, 10, 10, 20)))))
    split = load_dataset(root).splits["train"]
    assert split.warnings == {}
    np.testing.assert_allclose(split.records[-1].boxes, [[5, 10, 15, 30]])


# ----------------------------------------------------------------------------- warnings


def warning_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_degenerate_outside_and_clipped_boxes_are_counted(tmp_path, caplog):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["annotations"].extend([
        box(20, 2, (5, 5, 0, 10)), box(21, 2, (5, 5, 10, -3)),  # degenerate
        box(22, 2, (70, 5, 10, 10)), box(23, 2, (-20, -20, 20, 20)),  # outside 64x48
        box(24, 2, (-5, 40, 20, 20)), box(25, 2, (60, 2, 10.5, 5)),  # partly outside
    ]))
    with caplog.at_level(logging.WARNING):
        split = load_dataset(root).splits["train"]
    assert dict(split.warnings) == {"degenerate_box": 2, "box_outside_image": 2, "box_clipped": 2}
    np.testing.assert_allclose(split.records[2].boxes, [[0, 40, 15, 48], [60, 2, 64, 7]])
    lines = warning_lines(caplog)
    assert len(lines) == 3
    ann_file = str(root / "train" / ANN)
    for reason, ann_id in (("zero or negative", 20), ("entirely outside", 22), ("clipped", 24)):
        line = next(x for x in lines if reason in x)
        assert ann_file in line and f"annotation id {ann_id} " in line


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path, caplog):
    root = make_export(tmp_path / "d")
    for i in range(3, 8):
        write_image(root / "train" / f"img{i}.jpg")
    edit(root / "train" / ANN, lambda d: d["images"].extend(image(i) for i in range(3, 8)))
    full = (root / "train" / "img0.jpg").read_bytes()
    (root / "train" / "img0.jpg").write_bytes(full[: len(full) // 2])  # truncated
    (root / "train" / "img1.jpg").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING):
        split = load_dataset(root).splits["train"]
    assert dict(split.warnings) == {"corrupt_image": 2}
    assert [r.image_id for r in split.records] == [2, 3, 4, 5, 6, 7]
    (line,) = warning_lines(caplog)
    assert str(root / "train" / ANN) in line and "img0.jpg" in line and "truncated" in line


def test_unsupported_format_is_counted(tmp_path):
    root = make_export(tmp_path / "d")
    Image.new("RGB", (64, 48)).save(root / "train" / "anim.gif")
    edit(root / "train" / ANN, lambda d: d["images"].append(image(9, name="anim.gif")))
    assert dict(load_dataset(root).splits["train"].warnings) == {"unsupported_image": 1}


def test_size_mismatch_uses_the_pixels(tmp_path, caplog):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["images"][0].update(width=128, height=96))
    with caplog.at_level(logging.WARNING):
        split = load_dataset(root).splits["train"]
    assert dict(split.warnings) == {"size_mismatch": 1}
    record = split.records[0]
    assert (record.width, record.height) == (64, 48)
    np.testing.assert_allclose(record.boxes, [[4, 4, 24, 14], [30, 20, 40, 30]])  # boxes unscaled
    (line,) = warning_lines(caplog)
    assert "image id 0" in line and "128x96" in line and "64x48" in line


def test_minority_of_missing_images_is_a_warning(tmp_path):
    root = make_export(tmp_path / "d")
    (root / "train" / "img2.jpg").unlink()
    assert dict(load_dataset(root).splits["train"].warnings) == {"missing_image": 1}


# ----------------------------------------------------------------------------- errors


def test_missing_annotation_file(tmp_path):
    root = make_export(tmp_path / "d")
    (root / "valid" / ANN).unlink()
    raises(root, str(root / "valid" / ANN), "annotation file not found")
    raises({"train": (tmp_path / "nope.json", root / "train")}, "nope.json", "not found")


def test_missing_dataset_folder_and_wrong_level(tmp_path):
    raises(tmp_path / "absent", "absent", "dataset folder not found")
    root = make_export(tmp_path / "d")
    raises(root / "train", str(root / "train"), "one split")
    raises(tmp_path, str(tmp_path), "no dataset found")


def test_missing_valid_split(tmp_path):
    write_split(tmp_path / "train", [image(0)], [box(0, 0)])
    raises(tmp_path, str(tmp_path), "no valid/ split")


def test_invalid_json_names_line_and_column(tmp_path):
    root = make_export(tmp_path / "d")
    (root / "train" / ANN).write_text('{\n  "images": [\n    {"id": 1,, }\n', encoding="utf-8")
    raises(root, str(root / "train" / ANN), "invalid JSON at line 3 column 14")


def test_json_that_is_not_an_object(tmp_path):
    root = make_export(tmp_path / "d")
    (root / "train" / ANN).write_text("[1, 2]", encoding="utf-8")
    raises(root, str(root / "train" / ANN), "expected a JSON object", "found a list")


def test_not_utf8(tmp_path):
    root = make_export(tmp_path / "d")
    (root / "train" / ANN).write_bytes(b"\xff\xfe\x00garbage")
    raises(root, str(root / "train" / ANN), "not a UTF-8")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d.pop(key))
    raises(root, str(root / "train" / ANN), f'missing top-level key "{key}"')


@pytest.mark.parametrize("section,index,key,expected", [
    ("images", 1, "file_name", 'image id 1 has no "file_name" key'),
    ("images", 0, "id", 'images[0] has no "id" key'),
    ("annotations", 2, "bbox", 'annotation id 2 has no "bbox" key'),
    ("annotations", 0, "image_id", 'annotation id 0 has no "image_id" key'),
    ("annotations", 1, "category_id", 'annotation id 1 has no "category_id" key'),
    ("categories", 2, "name", 'category id 2 has no "name" key'),
])
def test_missing_key_in_an_entry(tmp_path, section, index, key, expected):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d[section][index].pop(key))
    raises(root, str(root / "train" / ANN), expected)


def test_entry_that_is_not_an_object_or_has_a_bad_id(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["annotations"].append("oops"))
    raises(root, str(root / "train" / ANN), "annotations[3] must be an object")
    edit(root / "train" / ANN, lambda d: d["annotations"].__setitem__(3, box("x", 0)))
    raises(root, str(root / "train" / ANN), 'annotations[3] has "id" "x"; expected an integer')


@pytest.mark.parametrize("field,value,expected", [
    ("image_id", 99, "annotation id 1 points at unknown image id 99"),
    ("category_id", 7, "annotation id 1 points at unknown category id 7"),
    ("image_id", "0", 'annotation id 1 points at unknown image id "0"'),
])
def test_annotation_pointing_at_unknown_ids(tmp_path, field, value, expected):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["annotations"][1].update({field: value}))
    raises(root, str(root / "train" / ANN), expected)


@pytest.mark.parametrize("section,expected", [
    ("images", "duplicate image id 0 (images[0] and images[3])"),
    ("annotations", "duplicate annotation id 0 (annotations[0] and annotations[3])"),
    ("categories", "duplicate category id 0 (categories[0] and categories[3])"),
])
def test_duplicate_ids(tmp_path, section, expected):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d[section].append(dict(d[section][0])))
    raises(root, str(root / "train" / ANN), expected)


@pytest.mark.parametrize("bbox", [[1, 2, 3], "1,2,3,4", [1, 2, "3", 4], [1, 2, True, 4],
                                  [1, 2, float("nan"), 4], None])
def test_bbox_not_four_numbers(tmp_path, bbox):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["annotations"][1].update(bbox=bbox))
    raises(root, str(root / "train" / ANN), "annotation id 1 has bbox", "expected a list of 4 numbers")


@pytest.mark.parametrize("field,value,expected", [
    ("width", 0, 'image id 1 has "width" 0; expected a positive integer'),
    ("height", "48", 'image id 1 has "height" "48"'),
    ("file_name", "", 'image id 1 has "file_name" ""'),
])
def test_bad_image_fields(tmp_path, field, value, expected):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["images"][1].update({field: value}))
    raises(root, str(root / "train" / ANN), expected)


def test_bad_iscrowd(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["annotations"][0].update(iscrowd=2))
    raises(root, str(root / "train" / ANN), 'annotation id 0 has "iscrowd" 2; expected 0 or 1')


def test_two_entries_for_one_file(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["images"][1].update(file_name="img0.jpg"))
    raises(root, str(root / "train" / ANN), "image ids 0 and 1 both name the file 'img0.jpg'")


def test_category_conflict_between_splits_names_both_files(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "valid" / ANN, lambda d: d["categories"][1].update(name="kitten"))
    message = raises(root, "category id 1")
    assert str(root / "train" / ANN) in message and str(root / "valid" / ANN) in message
    assert '"cat"' in message and '"kitten"' in message


def test_duplicate_class_names(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "train" / ANN, lambda d: d["categories"][2].update(name="cat"))
    edit(root / "valid" / ANN, lambda d: d["categories"][2].update(name="cat"))
    raises(root, str(root / "train" / ANN), 'categories 1 and 2 are both named "cat"')


def test_no_boxes_anywhere(tmp_path):
    root = make_export(tmp_path / "d")
    for split in ("train", "valid"):
        edit(root / split / ANN, lambda d: d.update(annotations=[]))
    raises(root, str(root / "train" / ANN), "no boxes in any split")


def test_missing_image_folder(tmp_path):
    root = make_export(tmp_path / "d")
    splits = {"train": (root / "train" / ANN, root / "train"),
              "valid": (root / "valid" / ANN, tmp_path / "gone")}
    raises(splits, str(tmp_path / "gone"), 'image folder of the "valid" split not found')


def test_empty_split_without_images(tmp_path):
    root = make_export(tmp_path / "d")
    edit(root / "valid" / ANN, lambda d: d.update(images=[], annotations=[]))
    raises(root, str(root / "valid" / ANN), 'empty split "valid"', "lists no images")


def test_empty_split_when_every_image_is_missing(tmp_path):
    root = make_export(tmp_path / "d")
    for f in (root / "valid").glob("*.jpg"):
        f.unlink()
    raises(root, str(root / "valid" / ANN), 'empty split "valid"', "none of its 2 images", "img0.jpg")


def test_most_images_missing_means_wrong_folder(tmp_path):
    root = make_export(tmp_path / "d")
    (root / "train" / "img0.jpg").unlink()
    (root / "train" / "img1.jpg").unlink()
    raises(root, str(root / "train" / ANN), "2 of 3 images are missing", "is the image folder right?")


def test_empty_split_when_every_image_is_corrupt(tmp_path):
    root = make_export(tmp_path / "d")
    for f in (root / "valid").glob("*.jpg"):
        f.write_bytes(b"")
    raises(root, str(root / "valid" / ANN), 'empty split "valid"', "no usable image", "corrupt_image: 2")


def test_splits_sharing_images_get_a_note(tmp_path):
    root = make_export(tmp_path / "d")
    ann = root / "train" / ANN
    dataset = load_dataset(splits={"train": (ann, root / "train"), "valid": (ann, root / "train")})
    assert dataset.notes[-1] == "splits train and valid share 3 image files"
    assert all(split.warnings == {} for split in dataset.splits.values())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_raw_to_oriented_matches_exif_transpose(orientation):
    stored = np.zeros((40, 80), np.uint8)
    stored[5:15, 10:30] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    turned = np.asarray(ImageOps.exif_transpose(image))
    ys, xs = np.nonzero(turned)
    expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    got = raw_to_oriented(np.array([[10, 5, 30, 15]], np.float64), orientation, 80, 40)
    np.testing.assert_array_equal(got[0], expected)
