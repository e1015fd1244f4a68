"""benchmarks/peer_yolo.py's light parent-side logic: pair parsing, ratios and the table (no training)."""

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location("peer_yolo", Path(__file__).parents[1] / "benchmarks" / "peer_yolo.py")
peer = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(peer)


def test_pairs_accept_an_activation_variant_and_reject_unknown_ones():
    assert peer._pair("tiny:320") == ("tiny", 320)
    assert peer._pair("nano-silu:192") == ("nano-silu", 192)
    assert peer.split_variant("nano-silu") == ("nano", {"act": "silu"})
    assert peer.split_variant("tiny") == ("tiny", {})
    for bad in ("nano-gelu:192", "nano", "nano:abc", ":192"):
        with pytest.raises(argparse.ArgumentTypeError, match="SIZE"):
            peer._pair(bad)


def _run(kind, name, imgsz, mAP, wall):
    return {"kind": kind, "name": name, "model": name, "imgsz": imgsz, "mAP": mAP, "mAP50": 2 * mAP,
            "mAP_small": mAP / 2, "wall_s": wall, "images_per_s": 100.0, "peak_mem_gib": 1.0, "params": 2_000_000}


def test_every_rtmdet_variant_is_compared_with_the_yolo_run_of_its_image_size():
    runs = [_run("rtmdet", "rtmdet_tiny_320", 320, 0.40, 300), _run("yolo", "yolo11n_320", 320, 0.32, 350),
            _run("rtmdet", "rtmdet_nano_192", 192, 0.20, 250), _run("rtmdet", "rtmdet_nano_silu_192", 192, 0.24, 250),
            _run("yolo", "yolo11n_192", 192, 0.20, 400),
            {"kind": "rtmdet", "name": "rtmdet_s_640", "imgsz": 640, "error": "exit 1"}]
    pairs = {(p["rtmdet"], p["yolo"]): p for p in peer.pair_ratios(runs)}
    assert set(pairs) == {("rtmdet_tiny_320", "yolo11n_320"), ("rtmdet_nano_192", "yolo11n_192"),
                          ("rtmdet_nano_silu_192", "yolo11n_192")}
    assert pairs["rtmdet_nano_silu_192", "yolo11n_192"]["mAP_ratio"] == pytest.approx(1.2)
    assert pairs["rtmdet_tiny_320", "yolo11n_320"]["time_ratio"] == pytest.approx(300 / 350)
    table = peer.format_table({"settings": {"epochs": 100, "batch": 32, "seed": 0, "workers": 16},
                               "runs": runs, "pairs": peer.pair_ratios(runs)})
    assert "| rtmdet_nano_silu_192 | 192 | 0.2400 | 0.4800 |" in table
    assert "rtmdet_s_640 | 640 | failed: exit 1" in table
    assert "rtmdet_nano_silu_192 / yolo11n_192: mAP 1.200x" in table


def test_the_segment_pair_compares_masks_and_boxes_of_the_same_task_and_size():
    seg = [dict(_run("rtmdet", "rtmdet_ins_tiny_320", 320, 0.33, 300), task="segment", mask_mAP=0.30, mask_mAP50=0.5),
           dict(_run("yolo", "yolo11n_seg_320", 320, 0.30, 400), task="segment", mask_mAP=0.25, mask_mAP50=0.4)]
    box = [_run("yolo", "yolo11n_320", 320, 0.5, 100)]  # a detect run of the same size is not its peer
    pairs = peer.pair_ratios(box + seg)
    assert [(p["rtmdet"], p["yolo"]) for p in pairs] == [("rtmdet_ins_tiny_320", "yolo11n_seg_320")]
    assert pairs[0]["mask_mAP_ratio"] == pytest.approx(1.2) and pairs[0]["mAP_ratio"] == pytest.approx(1.1)
    table = peer.format_table({"settings": {"epochs": 100, "batch": 32, "seed": 0, "workers": 16},
                               "runs": seg, "pairs": pairs})
    assert "| mask mAP50-95 | mask mAP50 | mAP50-95 |" in table
    assert "| rtmdet_ins_tiny_320 | 320 | 0.3000 | 0.5000 | 0.3300 | 0.6600 |" in table
    assert "mask mAP 1.200x, mask mAP50 1.250x, box mAP 1.100x" in table
    assert peer.rtmdet_run_name("tiny", 320, "segment") == "rtmdet_ins_tiny_320"
    assert peer.yolo_run_name(320, "segment") == "yolo11n_seg_320"


def test_yolo_seg_labels_hold_each_instance_polygon_normalized(tmp_path):
    from pycocotools import mask as mask_utils

    from rtmdet.data.coco import load_dataset
    from rtmdet.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "shapes", train=3, valid=2, empty_fraction=0.0)
    dataset = load_dataset(root, masks=True)
    yaml_path = peer.write_yolo_dataset(dataset, tmp_path / "yolo", polygons=True)
    rec = dataset.splits["train"].records[0]
    rows = (yaml_path.parent / "labels" / "train" / f"{rec.image_id}.txt").read_text().splitlines()
    assert len(rows) == len(rec.boxes) > 0
    for row, label, segm in zip(rows, rec.labels, rec.segmentations, strict=True):
        values = row.split()
        assert int(values[0]) == label and len(values) % 2 == 1
        xy = np.asarray(values[1:], float).reshape(-1, 2) * [rec.width, rec.height]
        assert np.allclose(xy, np.asarray(segm[0]).reshape(-1, 2), atol=1e-3 * max(rec.width, rec.height))
    # An RLE instance becomes its outline: the polygon's mask covers the RLE's pixels.
    square = np.zeros((40, 60), np.uint8)
    square[10:30, 20:45] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    poly = peer.yolo_polygon({"size": rle["size"], "counts": rle["counts"].decode()}, 40, 60)
    drawn = mask_utils.decode(mask_utils.frPyObjects([poly.reshape(-1).tolist()], 40, 60)).max(axis=2)
    inter, union = (drawn & square).sum(), (drawn | square).sum()
    assert inter / union > 0.9
