"""The `verify` stage for a classifier checkpoint (rtmdet.export.verify_classify, reached through
run_verify): every format's top-1 on the split, verify.json's layout, the top-1 drop limits and
the split names. A nano classifier at 32 px, fitted for a few steps to solid-colour images drawn
here, and its ONNX export (all but one test run in ~3 s); the TFLite rows need an onnx2tf
conversion (~18 s), in the one test marked slow.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import random_detector_checkpoint

SIZE = 32
CLASSES = ["blue", "green", "red"]  # the image's dominant BGR channel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("verify_classify")


@pytest.fixture(scope="module")
def data_root(workdir) -> Path:
    """train/ and val/, 4 images per class: one channel high, noise on top."""
    root = workdir / "colours"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                base = np.full((SIZE, SIZE, 3), 60.0)
                base[..., label] = 200
                img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / split / name / f"{i}.png"), img)
    return root


@pytest.fixture(scope="module")
def dataset(data_root):
    from rtmdet.data.class_folders import load_class_folders

    return load_class_folders(data_root)


@pytest.fixture(scope="module")
def model(dataset):
    """Fitted for a few full-batch steps, BN statistics then set from the train images, so its
    predictions differ between images (an untrained net says one class for all, which any file
    would score alike)."""
    from conftest import fit_classifier

    return fit_classifier(dataset.splits["train"].images, len(CLASSES), SIZE, steps=6)


@pytest.fixture(scope="module")
def weights(workdir, model) -> Path:
    from rtmdet.models.checkpoint import save_classifier_checkpoint

    return save_classifier_checkpoint(model, CLASSES, workdir / "models" / "best.pt")


@pytest.fixture(scope="module")
def export_dir(workdir, model) -> Path:
    from rtmdet.export.classify import export_classifier_onnx

    folder = workdir / "export"
    export_classifier_onnx(model, folder / "best.onnx", CLASSES)
    return folder


def test_verify_scores_torch_and_onnx(weights, export_dir, dataset, tmp_path):
    from rtmdet.export.classify import score_classifier
    from rtmdet.export.verify import run_verify

    out = tmp_path / "verify.json"
    summary = run_verify(weights, export_dir, tmp_path / "no_qat", dataset, out, threads=2, latency_images=3,
                         batch_size=4)  # split: the stage's default "valid", which is val here
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(summary))
    assert {k: written[k] for k in ("task", "metric", "split", "threads")} == \
        {"task": "classify", "metric": "top1", "split": "val", "threads": 2}
    rows = written["formats"]
    assert list(rows) == ["torch", "onnx"]
    for name, path in (("torch", weights), ("onnx", export_dir / "best.onnx")):
        expected = score_classifier(path, dataset, "val", 4, 2)
        assert rows[name]["top1"] == expected.top1 and rows[name]["top5"] is None  # 3 classes: no top-5
        assert rows[name]["file"] == str(path) and rows[name]["latency_ms"] > 0
        assert rows[name]["size_mb"] == round(path.stat().st_size / 1e6, 3)
        assert "operators" not in rows[name]  # .tflite rows only
    assert 1 / 3 < rows["torch"]["top1"]  # fitted: the equalities above compare real predictions
    assert rows["torch"]["drop"] == 0.0 and abs(rows["onnx"]["drop"]) < 1e-9


def test_val_split_by_its_own_name(weights, export_dir, dataset, tmp_path):
    from rtmdet.export.verify import run_verify

    summary = run_verify(weights, export_dir, None, dataset, tmp_path / "verify.json", split="val", latency_images=1)
    assert summary["split"] == "val" and list(summary["formats"]) == ["torch", "onnx"]


@pytest.mark.parametrize("split", ["bogus", "test"])
def test_unknown_split_is_one_line_naming_the_splits(split, weights, export_dir, dataset, tmp_path):
    from rtmdet.export.verify import VerifyError, run_verify

    out = tmp_path / "verify.json"
    with pytest.raises(VerifyError) as err:
        run_verify(weights, export_dir, None, dataset, out, split=split, latency_images=1)
    message = str(err.value)
    assert "\n" not in message and repr(split) in message and "(splits: train, val)" in message
    assert not out.exists()


def test_drop_beyond_max_drop_fails_after_verify_json(weights, export_dir, dataset, tmp_path, monkeypatch):
    import rtmdet.export.classify as classify
    from rtmdet.export.verify import VerifyError, run_verify

    real = classify.score_classifier

    def onnx_loses_a_quarter(path, *args, **kwargs):
        result = real(path, *args, **kwargs)
        return dataclasses.replace(result, top1=result.top1 - 0.25) if Path(path).suffix == ".onnx" else result

    monkeypatch.setattr(classify, "score_classifier", onnx_loses_a_quarter)
    out = tmp_path / "verify.json"
    with pytest.raises(VerifyError) as err:
        run_verify(weights, export_dir, None, dataset, out, latency_images=1, max_drop=0.02, int8_max_drop=0.5)
    message = str(err.value)
    assert "\n" not in message and "torch (" not in message
    assert message.startswith(f"onnx ({export_dir / 'best.onnx'}): top-1 ") and "verify.max_drop" in message
    assert json.loads(out.read_text())["formats"]["onnx"]["drop"] == 0.25  # written before the failure


def test_int8_formats_use_int8_max_drop():
    from rtmdet.export.verify_classify import check_drops

    def row(drop):
        return {"top1": 0.9 - drop, "drop": drop, "file": "f"}

    # 0.6 points: within max_drop 0.02, beyond the 0.5-point int8 limit (0.005).
    summary = {"formats": {"torch": row(0.0), "onnx": row(0.006), "tflite_int8": row(0.006),
                           "qat_int8": row(0.004)}}
    problems = check_drops(summary, max_drop=0.02, int8_max_drop=0.005)
    assert len(problems) == 1 and problems[0].startswith("tflite_int8 (f): top-1 0.8940 is 0.0060 below torch")
    assert "verify.int8_max_drop" in problems[0]


def test_export_with_other_classes_fails_before_scoring(weights, model, dataset, tmp_path):
    from rtmdet.export.classify import export_classifier_onnx
    from rtmdet.export.verify import VerifyError, run_verify

    other = export_classifier_onnx(model, tmp_path / "export" / "best.onnx", ["cat", "dog", "fox"]).path
    out = tmp_path / "verify.json"
    with pytest.raises(VerifyError) as err:
        run_verify(weights, other.parent, None, dataset, out, latency_images=1)
    assert "\n" not in str(err.value) and str(other) in str(err.value) and "cat, dog, fox" in str(err.value)
    assert not out.exists()


def test_checkpoint_and_dataset_of_other_kinds(weights, export_dir, dataset, tmp_path):
    from rtmdet.data.records import DetectionDataset
    from rtmdet.export.verify import VerifyError, run_verify

    detector = random_detector_checkpoint(tmp_path / "det.pt", classes=CLASSES, image_size=64)
    out = tmp_path / "verify.json"
    with pytest.raises(VerifyError, match="a detector checkpoint, but the dataset given is class folders"):
        run_verify(detector, export_dir, None, dataset, out, latency_images=1)
    with pytest.raises(VerifyError, match="a classifier checkpoint, but the dataset given is a detection dataset"):
        run_verify(weights, export_dir, None, DetectionDataset(CLASSES, [0, 1, 2], {}), out, latency_images=1)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnx2tf") is None, reason="onnx2tf not installed")
def test_tflite_rows_carry_operators_and_int8_uses_its_limit(weights, model, export_dir, dataset, tmp_path):
    """One onnx2tf conversion (fp32 + int8, ~18 s); the int8 file doubles as the QAT file."""
    import shutil

    from rtmdet.export.classify import classifier_calibration, export_classifier_tflite, score_classifier
    from rtmdet.export.verify import VerifyError, run_verify

    folder, qat = tmp_path / "export", tmp_path / "qat"
    shutil.copytree(export_dir, folder)
    calibration, files = classifier_calibration(dataset, 12, SIZE)
    paths = {r.meta.precision: r.path for r in export_classifier_tflite(
        model, folder, ["fp32", "int8"], calibration, calib_files=files, stem="best", classes=CLASSES)}
    qat.mkdir()
    for f in (paths["int8"], paths["int8"].with_suffix(".json")):
        shutil.copy(f, qat / f.name.replace("best_int8", "qat"))
    out = tmp_path / "verify.json"
    summary = run_verify(weights, folder, qat, dataset, out, latency_images=2, max_drop=1.0, int8_max_drop=1.0)
    rows = summary["formats"]
    assert list(rows) == ["torch", "onnx", "tflite_fp32", "tflite_int8", "qat_int8"]
    for name in ("tflite_fp32", "tflite_int8", "qat_int8"):
        assert rows[name]["operators"]["CONV_2D"] > 0 and rows[name]["latency_ms"] > 0
        assert rows[name]["top1"] == score_classifier(rows[name]["file"], dataset, "val", 8, 2).top1
    # fp32 logits differ from torch by ~1e-5 of their range: at most one of the 12 images may flip elsewhere.
    assert abs(rows["tflite_fp32"]["drop"]) <= 1 / 12 + 1e-5
    assert rows["tflite_int8"]["size_mb"] < rows["tflite_fp32"]["size_mb"] / 3
    # Only the int8 formats are held to int8_max_drop: a negative one fails them, not the float ones.
    with pytest.raises(VerifyError) as err:
        run_verify(weights, folder, qat, dataset, out, latency_images=1, max_drop=1.0, int8_max_drop=-1.0)
    lines = str(err.value).split("; ")
    assert [line.split(" ", 1)[0] for line in lines] == ["tflite_int8", "qat_int8"]
    assert all("verify.int8_max_drop" in line for line in lines)
