"""benchmarks/peer_yolo.py's rotate pair, parent side and the YOLO OBB helpers (no training, no ultralytics)."""

import importlib.util
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rtmdet.geometry.rotated import quad_to_rbox, rbox_to_corners

SPEC = importlib.util.spec_from_file_location("peer_yolo", Path(__file__).parents[1] / "benchmarks" / "peer_yolo.py")
peer = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(peer)


def _dota(root: Path, boxes: dict[str, list[tuple]], val: str = "valid", size=(200, 120)) -> Path:
    """A tiny DOTA-layout dataset: train/ and val/ (or valid/), each image with boxes[stem] (cx, cy, w, h, angle)."""
    for split in ("train", val):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labelTxt").mkdir(parents=True)
        for stem, rbs in boxes.items():
            cv2.imwrite(str(root / split / "images" / f"{stem}.png"), np.zeros((size[1], size[0], 3), np.uint8))
            lines = []
            for rb in rbs:
                quad = rbox_to_corners(torch.tensor(rb, dtype=torch.float64)).reshape(-1).tolist()
                lines.append(" ".join(f"{v:.4f}" for v in quad) + " box 0")
            (root / split / "labelTxt" / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
    return root


def _angle_close(a: float, b: float) -> bool:
    d = (a - b) % math.pi
    return min(d, math.pi - d) < 1e-3


def test_the_obb_view_links_the_images_and_its_corners_reproduce_each_rotated_box(tmp_path):
    from rtmdet.data.dota import load_dota

    box = (80.0, 50.0, 60.0, 20.0, 0.5)
    root = _dota(tmp_path / "dota", {"a": [box, (30.0, 40.0, 10.0, 24.0, -0.3)], "b": []})
    dataset = load_dota(root)
    yaml_path = peer.write_yolo_obb_dataset(dataset, tmp_path / "yolo")
    data = __import__("yaml").safe_load(yaml_path.read_text())
    assert data["names"] == {0: "box"} and (data["train"], data["val"]) == ("images/train", "images/val")
    view = yaml_path.parent
    for split, source in (("train", dataset.splits["train"]), ("val", peer._val_split(dataset))):
        for rec in source.records:
            image = view / "images" / split / f"{rec.image_id}.png"
            assert image.resolve() == rec.file.resolve()
            rows = (view / "labels" / split / f"{rec.image_id}.txt").read_text().splitlines()
            assert len(rows) == len(rec.rboxes)
            for row, rb, label in zip(rows, rec.rboxes, rec.labels, strict=True):
                values = row.split()
                assert int(values[0]) == label and len(values) == 9
                xy = np.asarray(values[1:], float).reshape(1, 4, 2)
                assert (xy >= 0).all() and (xy <= 1).all()
                back = quad_to_rbox(xy * [rec.width, rec.height])[0][0]
                assert np.allclose(back[:4], rb[:4], atol=1e-3)
                assert _angle_close(float(back[4]), float(rb[4]))
    a = next(r for r in dataset.splits["train"].records if r.file.stem == "a")
    assert np.allclose(a.rboxes[0, :4], box[:4], atol=1e-3)  # the record is the box written above


def test_obb_rows_clip_corners_outside_the_image():
    rows = peer.yolo_obb_rows(np.array([[5.0, 5.0, 20.0, 10.0, 0.3]]), np.array([2]), 100, 50)
    values = np.asarray(rows[0].split()[1:], float)
    assert rows[0].startswith("2 ") and values.min() == 0.0 and (values <= 1).all()
    assert peer.yolo_obb_rows(np.zeros((0, 5)), np.zeros(0, np.int64), 100, 50) == []


def test_the_val_split_is_valid_else_val_else_one_clear_line(tmp_path):
    from rtmdet.data.dota import RotatedDataset, RotatedSplit

    def ds(*names):
        return RotatedDataset(["box"], {n: RotatedSplit(n, tmp_path / n, []) for n in names})

    assert peer._val_split(ds("train", "valid", "test")).name == "valid"
    assert peer._val_split(ds("train", "val")).name == "val"
    with pytest.raises(SystemExit, match="no valid/ \\(or val/\\) split"):
        peer._val_split(ds("train", "test"))


def test_yolo_corners_become_rotated_detections():
    rb = torch.tensor([[120.0, 80.0, 50.0, 16.0, 0.4], [40.0, 30.0, 10.0, 30.0, -1.2]], dtype=torch.float64)
    quads = rbox_to_corners(rb).numpy()
    quads = np.roll(quads, 1, axis=1)[:, ::-1]  # another start corner and winding, as another convention gives
    dets = peer.yolo_obb_detections(quads.astype(np.float32), np.array([0.9, 0.2], np.float32),
                                    np.array([1.0, 0.0], np.float32))
    assert dets.rboxes.shape == (2, 5) and dets.labels.dtype == np.int64 and dets.labels.tolist() == [1, 0]
    assert np.allclose(dets.scores, [0.9, 0.2])
    for got, want in zip(dets.rboxes, rb.numpy(), strict=True):
        w, h, a = want[2], want[3], want[4]
        if not np.isclose(got[2], w, atol=1e-3):  # the same rectangle with its sides swapped
            w, h, a = h, w, a + math.pi / 2
        assert np.allclose(got[:4], [want[0], want[1], w, h], atol=1e-3) and _angle_close(float(got[4]), a)
    empty = peer.yolo_obb_detections(np.zeros((0, 4, 2), np.float32), np.zeros(0), np.zeros(0))
    assert empty.rboxes.shape == (0, 5) and empty.scores.shape == (0,) and empty.labels.shape == (0,)


def test_the_rotate_table_shows_the_dota_maps_and_the_pair_line():
    def run(kind, name, mAP, mAP50, wall):
        return {"kind": kind, "name": name, "model": name, "task": "rotate", "imgsz": 640, "mAP": mAP,
                "mAP50": mAP50, "mAP75": mAP / 2, "mAP_area": mAP + 0.01, "mAP50_area": mAP50,
                "mAP75_area": mAP / 2, "wall_s": wall, "images_per_s": 50.0, "peak_mem_gib": 3.0,
                "params": 4_900_000}

    runs = [run("rtmdet", "rtmdet_r_tiny_640", 0.60, 0.90, 600), run("yolo", "yolo11n_obb_640", 0.50, 0.85, 400),
            {"kind": "yolo", "name": "yolo11n_640", "imgsz": 640, "mAP": 0.4, "mAP50": 0.6, "wall_s": 1.0}]
    pairs = peer.pair_ratios(runs)  # the detect run of the same size is not the rotated model's peer
    assert [(p["rtmdet"], p["yolo"]) for p in pairs] == [("rtmdet_r_tiny_640", "yolo11n_obb_640")]
    assert pairs[0]["mAP_ratio"] == pytest.approx(1.2) and pairs[0]["mAP50_diff"] == pytest.approx(0.05)
    assert pairs[0]["time_ratio"] == pytest.approx(1.5)
    table = peer.format_table({"settings": {"task": "rotate", "epochs": 36, "batch": 8, "seed": 0, "workers": 8},
                               "runs": runs[:2] + [{"name": "rtmdet_r_s_640", "imgsz": 640, "error": "exit 1"}],
                               "pairs": pairs})
    assert "| model | imgsz | mAP50:95 | mAP50 | mAP75 | mAP50:95 area |" in table
    assert "| rtmdet_r_tiny_640 | 640 | 0.6000 | 0.9000 | 0.3000 | 0.6100 | 600 | 50 | 3.00 | 4.90 |" in table
    assert "rtmdet_r_s_640 | 640 | failed: exit 1 | | | | | | | |" in table
    assert "rotated NMS IoU 0.1, 300 dets/img" in table
    assert "rtmdet_r_tiny_640 / yolo11n_obb_640: mAP50:95 1.200x, mAP50 +0.0500 (RTMDet - YOLO), wall time 1.500x" \
        in table
    assert all(line.count("|") == 11 for line in table.splitlines() if line.startswith("|"))
    assert peer.rtmdet_run_name("tiny", 640, "rotate") == "rtmdet_r_tiny_640"
    assert peer.yolo_run_name(640, "rotate") == "yolo11n_obb_640"


def test_rotated_stats_keep_the_numbers_and_drop_detections_and_timings():
    ev = {"mAP": 0.5, "mAP50": 0.8, "mAP75": 0.5, "mAP_area": 0.5, "mAP50_area": 0.8, "mAP75_area": 0.5,
          "per_class": [{"class": "box"}], "detections": [object()], "seconds": 1.0, "images": 3}
    assert sorted(peer.rotated_stats(ev)) == ["mAP", "mAP50", "mAP50_area", "mAP75", "mAP75_area", "mAP_area",
                                              "per_class"]


def test_task_rotate_parses_with_its_default_pair_and_a_recipe_without_stage2(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["peer_yolo.py", "--task", "rotate", "--data", str(tmp_path)])
    args = peer.parse_args()
    assert args.task == "rotate" and args.pairs == [("tiny", 640)]
    assert peer.recipe_of("rotate")["stage2_epochs"] == 0 and peer.RTMDET_ROT_RECIPE["stage2_epochs"] == 0
    assert peer.recipe_of("rotate")["lr"] == 0.008  # the rest is the small-data recipe
    assert {k: v for k, v in peer.recipe_of("rotate").items() if k not in ("stage2_epochs", "lr")} == \
        {k: v for k, v in peer.RTMDET_RECIPE.items() if k not in ("stage2_epochs", "lr")}
    assert peer.recipe_of("detect")["stage2_epochs"] == 20  # the other tasks' recipes are unchanged
    assert peer.YOLO_MODELS["rotate"] == "yolo11n-obb.yaml"
    settings = peer.settings_of(args)
    assert settings["rtmdet_recipe"]["stage2_epochs"] == 0
    assert (settings["score_thr"], settings["nms_iou"], settings["max_dets"]) == (0.001, 0.1, 300)
    over = peer._overrides(["train.lr=0.008"], "rotate")
    assert over["train"] == {"lr": 0.008}
    monkeypatch.setattr(sys, "argv", ["peer_yolo.py", "--task", "rotate", "--pairs", "nano:320", "s:1024"])
    assert peer.parse_args().pairs == [("nano", 320), ("s", 1024)]


def test_the_parent_check_fails_in_one_line_without_a_validation_split(tmp_path):
    root = tmp_path / "dota"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labelTxt").mkdir(parents=True)
    cv2.imwrite(str(root / "train" / "images" / "a.png"), np.zeros((50, 60, 3), np.uint8))
    (root / "train" / "labelTxt" / "a.txt").write_text("10 10 30 10 30 20 10 20 box 0\n")
    with pytest.raises(SystemExit, match="--task rotate: .* no valid/ \\(or val/\\) split"):
        peer.check_dota(root)
    with pytest.raises(SystemExit, match="--task rotate: .*not found"):
        peer.check_dota(tmp_path / "missing")
