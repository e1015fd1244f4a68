"""benchmarks/peer_yolo.py's classify pair, parent side and scoring helpers (no training, no ultralytics)."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location("peer_yolo", Path(__file__).parents[1] / "benchmarks" / "peer_yolo.py")
peer = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(peer)


def _class_folders(root: Path, val: str = "valid", classes=("red", "blue", "green"), per_class: int = 2) -> Path:
    for split in ("train", val):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                cv2.imwrite(str(folder / f"{i}.png"), np.full((20, 24, 3), 40 * c + i, np.uint8))
    return root


def test_yolo_probabilities_are_put_in_the_dataset_class_order_by_name():
    classes = ["cardboard", "glass", "metal"]
    order = peer.yolo_class_order({0: "metal", 1: "cardboard", 2: "glass"}, classes)
    assert order == [1, 2, 0]
    probs = np.array([[0.7, 0.2, 0.1]])  # YOLO says metal
    assert classes[int(probs[:, order].argmax(1)[0])] == "metal"
    assert peer.yolo_class_order(["cardboard", "glass", "metal"], classes) == [0, 1, 2]
    with pytest.raises(ValueError, match="not the dataset's"):
        peer.yolo_class_order({0: "cardboard", 1: "glass"}, classes)


def test_the_classify_table_shows_top1_top5_and_the_pair_difference():
    def run(kind, name, top1, top5, wall):
        return {"kind": kind, "name": name, "model": name, "task": "classify", "imgsz": 224, "top1": top1,
                "top5": top5, "wall_s": wall, "images_per_s": 500.0, "peak_mem_gib": 2.0, "params": 1_500_000}

    runs = [run("rtmdet", "rtmdet_cls_tiny_224", 0.90, 0.99, 300), run("yolo", "yolo11n_cls_224", 0.85, None, 200),
            {"kind": "yolo", "name": "yolo11n_224", "imgsz": 224, "mAP": 0.5, "mAP50": 0.7, "wall_s": 1.0}]
    pairs = peer.pair_ratios(runs)  # the detect run of the same size is not the classifier's peer
    assert [(p["rtmdet"], p["yolo"]) for p in pairs] == [("rtmdet_cls_tiny_224", "yolo11n_cls_224")]
    assert pairs[0]["top1_diff"] == pytest.approx(0.05) and pairs[0]["top5_diff"] is None
    table = peer.format_table({"settings": {"task": "classify", "epochs": 100, "batch": 64, "seed": 0, "workers": 16},
                               "runs": runs[:2] + [{"name": "rtmdet_cls_s_224", "imgsz": 224, "error": "exit 1"}],
                               "pairs": pairs})
    assert "| model | imgsz | top-1 | top-5 |" in table
    assert "| rtmdet_cls_tiny_224 | 224 | 0.9000 | 0.9900 | 300 | 500 | 2.00 | 1.50 |" in table
    assert "| yolo11n_cls_224 | 224 | 0.8500 | n/a |" in table
    assert "rtmdet_cls_s_224 | 224 | failed: exit 1" in table
    assert "rtmdet_cls_tiny_224 / yolo11n_cls_224: top-1 +0.0500, top-5 n/a (RTMDet - YOLO), wall time 1.500x" in table
    assert peer.rtmdet_run_name("tiny", 224, "classify") == "rtmdet_cls_tiny_224"
    assert peer.yolo_run_name(224, "classify") == "yolo11n_cls_224"
    assert peer.DEFAULT_PAIRS["classify"] == [("tiny", 224)]


def test_the_yolo_view_links_every_image_under_train_and_val_with_every_class(tmp_path):
    from rtmdet.data.class_folders import load_class_folders

    root = _class_folders(tmp_path / "data")
    (root / "valid" / "blue" / "0.png").unlink()
    (root / "valid" / "blue" / "1.png").unlink()  # a class without val images keeps its folder in the view
    dataset = load_class_folders(root)
    view = peer.write_yolo_cls_dataset(dataset, tmp_path / "view")
    for split in ("train", "val"):
        assert sorted(d.name for d in (view / split).iterdir()) == sorted(dataset.classes)
    linked = sorted((f.parent.name, f.resolve()) for f in (view / "val").rglob("*.png"))
    assert linked == sorted((dataset.classes[im.label], im.file.resolve()) for im in dataset.splits["val"].images)
    assert len(list((view / "train").rglob("*.png"))) == 6


def test_rtmdet_classifier_checkpoints_are_scored_by_the_shared_scorer(tmp_path):
    from rtmdet.data.class_folders import load_class_folders
    from rtmdet.models.checkpoint import save_classifier_checkpoint
    from dataclasses import replace

    from rtmdet.models.classifier import build_classifier

    dataset = load_class_folders(_class_folders(tmp_path / "data", val="val"))
    model = build_classifier("tiny", num_classes=3)
    model.cfg = replace(model.cfg, image_size=32)  # as export_classifier_checkpoint resizes one
    best = save_classifier_checkpoint(model, dataset.classes, tmp_path / "best.pt")
    result = peer.score_rtmdet_classifier(best, dataset)
    assert 0.0 <= result["top1"] <= 1.0 and result["top5"] is None
    assert np.asarray(result["confusion"]).sum() == 6 and result["eval_imgsz"] == 32
    assert result["params"] == sum(p.numel() for p in model.parameters())
    other = save_classifier_checkpoint(model, ["a", "b", "c"], tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="not the dataset's"):
        peer.score_rtmdet_classifier(other, dataset)
