"""The synthetic default dataset: deterministic, valid Roboflow-style COCO, boxes on the shapes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from rtmdet.data.synthetic import CLASSES, main, make_synthetic_dataset, synthesize


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("a") / "shapes", seed=3, train=40, valid=10)


def test_same_seed_same_bytes_other_seed_other_bytes(dataset, tmp_path):
    again = make_synthetic_dataset(tmp_path / "b", seed=3, train=40, valid=10)
    other = make_synthetic_dataset(tmp_path / "c", seed=4, train=40, valid=10)
    assert _digest(dataset) == _digest(again)
    assert _digest(dataset) != _digest(other)
    assert sorted(p.name for p in dataset.iterdir()) == ["train", "valid"]  # no temp folders left


def test_roboflow_coco_layout(dataset):
    for split, count in (("train", 40), ("valid", 10)):
        coco = json.loads((dataset / split / "_annotations.coco.json").read_text())
        assert set(coco) == {"info", "licenses", "categories", "images", "annotations"}
        cats = coco["categories"]
        assert cats[0] == {"id": 0, "name": "shapes", "supercategory": "none"}
        assert [c["name"] for c in cats[1:]] == list(CLASSES) and [c["id"] for c in cats] == [0, 1, 2, 3, 4]
        assert len(coco["images"]) == count and len({i["id"] for i in coco["images"]}) == count
        images = {i["id"]: i for i in coco["images"]}
        anns = coco["annotations"]
        assert len({a["id"] for a in anns}) == len(anns)
        for a in anns:
            assert set(a) == {"id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd"}
            assert a["category_id"] in (1, 2, 3, 4) and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            im = images[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            assert a["area"] == w * h
        for im in coco["images"]:
            assert 240 <= im["width"] <= 400 and 240 <= im["height"] <= 400
            pixels = cv2.imread(str(dataset / split / im["file_name"]))
            assert pixels.shape == (im["height"], im["width"], 3)
            assert im["file_name"].endswith(".jpg") and ".rf." in im["file_name"]


def test_statistics_make_a_learnable_task(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", seed=0, train=150, valid=0)
    coco = json.loads((root / "train" / "_annotations.coco.json").read_text())
    images = {i["id"]: i for i in coco["images"]}
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=len(images))
    assert 0.02 <= (per_image == 0).mean() <= 0.15  # some images without objects
    assert per_image.max() <= 6 and 2 <= per_image[per_image > 0].mean() <= 4
    per_class = np.bincount([a["category_id"] for a in coco["annotations"]], minlength=5)
    assert per_class[0] == 0 and per_class[1:].min() > 0.15 * per_class.sum()
    rel = np.array([max(a["bbox"][2:]) / min(images[a["image_id"]]["width"], images[a["image_id"]]["height"])
                    for a in coco["annotations"]])
    assert (rel < 0.12).mean() < 0.3 and np.median(rel) > 0.15 and rel.max() < 0.7


def test_boxes_are_glued_to_the_shapes(dataset):
    coco = json.loads((dataset / "train" / "_annotations.coco.json").read_text())
    checked = 0
    for im in coco["images"][:15]:
        synth = synthesize(3, "train", im["id"])
        boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert [[x, y, x + bw, y + bh] for x, y, bw, bh in boxes] == synth.boxes.tolist()
        data = (dataset / "train" / im["file_name"]).read_bytes()
        assert data == cv2.imencode(".jpg", synth.image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        jpeg = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
        for k, (x1, y1, x2, y2) in enumerate(synth.boxes.tolist()):
            mask = synth.id_map == k
            # tight: every edge of the box touches the object's visible pixels, nothing outside
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
            assert mask[y1:y2, x1:x2].sum() == mask.sum()
            # and those pixels stand out from the background around the box
            ring = np.zeros_like(mask)
            ring[max(y1 - 3, 0) : y2 + 3, max(x1 - 3, 0) : x2 + 3] = True
            ring[y1:y2, x1:x2] = False
            ring &= synth.id_map < 0
            if ring.any():
                inside = jpeg[mask].mean(axis=0)
                assert np.abs(inside - jpeg[ring].mean(axis=0)).sum() > 40
            checked += 1
    assert checked >= 20


def test_it_takes_seconds(tmp_path):
    start = time.perf_counter()
    make_synthetic_dataset(tmp_path / "t", seed=1, train=50, valid=10)
    per_image = (time.perf_counter() - start) / 60
    assert per_image < 0.05  # 500 images well under half a minute


def test_command_line(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--seed", "2", "--train", "3", "--valid", "2"]) == 0
    assert "3 train + 2 valid" in capsys.readouterr().out
    assert len(list((tmp_path / "cli" / "valid").glob("*.jpg"))) == 2


@pytest.mark.skipif(importlib.util.find_spec("rtmdet.data.coco") is None, reason="coco reader not there yet")
def test_the_project_reader_reads_it(dataset):
    from rtmdet.data.coco import load_dataset

    data = load_dataset(dataset)
    assert data.classes == list(CLASSES) and data.category_ids == [1, 2, 3, 4]
    assert len(data.splits["train"].records) == 40 and len(data.splits["valid"].records) == 10


def test_masks_cover_each_shapes_visible_pixels(dataset):
    # The segment task reads the polygons; rasterized again they must be the objects' pixels.
    from rtmdet.data.coco import load_dataset
    from rtmdet.data.loader import load_record

    ds = load_dataset(dataset, masks=True)
    assert not ds.splits["train"].warnings  # every object got a usable polygon
    ious = []
    for record in ds.splits["train"].records[:15]:
        synth = synthesize(3, "train", int(record.image_id))
        masks = load_record(record).masks
        assert masks.shape[0] == len(synth.boxes)
        for m, k in zip(masks, synth.objects.tolist()):
            want = synth.id_map == k
            ious.append((m & want).sum() / (m | want).sum())
    # Contour polygons run through the boundary pixels' centres: on rasterizing, a half-pixel rim
    # goes, which costs small objects most (the smallest here: about 10 px across).
    assert len(ious) >= 20 and min(ious) > 0.7 and float(np.median(ious)) > 0.9, sorted(ious)[:5]
