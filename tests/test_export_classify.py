"""Classifier export: ONNX and TFLite (fp32, fp16, int8) files agree with torch, carry a
`task: classify` sidecar, score like torch on a class-folder split, and `rtmdet export` routes a
classifier checkpoint to them. One nano classifier at 64 px, fitted for a few steps to a toy
dataset drawn here, is exported once per module (one onnx2tf conversion, ~30 s).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import random_detector_checkpoint, rel_diff
from rtmdet.errors import CheckpointError

SIZE = 64
CLASSES = ("blue", "green", "red")  # the colour of the one shape in the image (BGR channel 0, 1, 2)
# max |ours - torch| / max |torch| of the logits, on the 16 fixed canvases and the 24 toy val
# images. Measured here: ONNX 3.8e-6, TFLite fp32 4.4e-6 / 1.7e-6 (another runtime's float32
# kernels: 1e-4 leaves room for another CPU, a wrong op is far above: the channel flip onnx2tf
# mis-converted moved the logits by 2.3 max abs); fp16 8.0e-3 / 3.0e-3 (10-bit mantissas through ~40
# layers; the canvases' logits are small, max 2.6, so the ratio is large: 3e-2 allows for another CPU).
FP32_TOL = 1e-4
FP16_TOL = 3e-2
# int8 top-1 agreement with torch. Measured: 0.69 (11/16) on the canvases, smooth noise far from
# the 24 calibration images (activations outside the calibrated ranges clip; the logits' mean
# top-2 margin there is 1.9 against a max int8 error of 1.8), and 1.0 on the val images (int8 rel
# error 0.20, margins 4.4). Thresholds: canvases 0.5 (chance is 1/3: a broken file lands there),
# val 0.9 (two of 24 may flip on another CPU's int8 rounding).
INT8_AGREEMENT = {"canvases": 0.5, "val": 0.9}

needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
needs_tflite = pytest.mark.skipif(importlib.util.find_spec("onnx2tf") is None, reason="onnx2tf not installed")


def _draw(rng: np.random.Generator, label: int) -> np.ndarray:
    """A noisy background with one circle or square, both of them mostly of channel `label` (BGR)."""
    h, w = int(rng.integers(56, 96)), int(rng.integers(56, 96))
    tint = np.zeros(3)
    tint[label] = 40  # the background leans to the class colour too: a random-feature model can tell
    img = np.clip(rng.normal(110, 30, (h, w, 3)) + tint, 0, 255).astype(np.uint8)
    color = [int(c) for c in rng.integers(0, 90, 3)]
    color[label] = int(rng.integers(190, 256))
    r = int(rng.integers(12, min(h, w) // 2 - 4))
    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    if rng.random() < 0.5:
        cv2.circle(img, (cx, cy), r, color, -1)
    else:
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1)
    return img


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_classify")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    root = workdir / "shapes"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 8)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                cv2.imwrite(str(folder / f"{i}.png"), _draw(rng, label))
    return root


@pytest.fixture(scope="module")
def fitted(workdir, dataset):
    """A nano classifier fitted for 8 full-batch AdamW steps (val top-1 0.875 here: its logits mean
    something), BN statistics then set from the train images, and its checkpoint."""
    from conftest import fit_classifier
    from rtmdet.data.class_folders import load_class_folders
    from rtmdet.models.checkpoint import save_classifier_checkpoint

    model = fit_classifier(load_class_folders(dataset).splits["train"].images, len(CLASSES), SIZE, steps=8)
    path = save_classifier_checkpoint(model, list(CLASSES), workdir / "cls_nano.pt")
    return model, path


@pytest.fixture(scope="module")
def tflite_files(workdir, dataset, fitted) -> dict[str, Path]:
    """fp32, fp16 and int8 files of the checkpoint through `rtmdet export`'s function (one conversion)."""
    from rtmdet.export.command import export_checkpoint

    paths = export_checkpoint(fitted[1], "tflite", ["fp32", "fp16", "int8"], data=dataset, calib_images=24,
                              out=workdir / "tflite")
    return {p.stem.rsplit("_", 1)[-1]: p for p in paths}


def test_checkpoint_roundtrip_and_wrong_kind(workdir, fitted):
    from rtmdet.models.checkpoint import checkpoint_task, is_classifier_checkpoint, load_classifier, load_model, \
        read_checkpoint

    model, path = fitted
    loaded, ckpt = load_classifier(path)
    assert is_classifier_checkpoint(ckpt) and checkpoint_task(path) == "classify"
    assert ckpt["meta"]["dataset_meta"]["classes"] == list(CLASSES) and loaded.cfg == model.cfg
    x = torch.rand(2, 3, SIZE, SIZE) * 255
    with torch.no_grad():
        assert torch.equal(loaded(loaded.normalize(x)), model(model.normalize(x)))
    detector = random_detector_checkpoint(workdir / "det.pt")
    assert not is_classifier_checkpoint(read_checkpoint(detector))
    with pytest.raises(CheckpointError) as err:
        load_classifier(detector)
    assert "\n" not in str(err.value) and "detector checkpoint" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "\n" not in str(err.value) and "classifier checkpoint" in str(err.value)


@needs_onnx
def test_rtmdet_export_onnx_matches_torch(workdir, fitted):
    from rtmdet.cli import main
    from rtmdet.export import read_meta
    from rtmdet.export import ExportError
    from rtmdet.export.classify import check_images, classifier_runner, read_classifier_meta, torch_logits

    model, path = fitted
    out = workdir / "onnx"
    assert main(["export", "--weights", str(path), "--format", "onnx", "--out", str(out)]) == 0
    onnx_path = out / "cls_nano.onnx"
    sidecar = json.loads(onnx_path.with_suffix(".json").read_text())
    assert sidecar["task"] == "classify" and sidecar["classes"] == list(CLASSES)
    assert sidecar["image_size"] == SIZE and sidecar["output_name"] == "logits" and sidecar["input_name"] == "images"
    assert sidecar["preprocess"] == "resize_center_crop" and read_classifier_meta(onnx_path).format == "onnx"
    images = check_images(SIZE)
    run, _, _ = classifier_runner(onnx_path)
    got = run(images.transpose(0, 2, 3, 1))
    assert got.shape == (len(images), len(CLASSES))
    assert rel_diff(got, torch_logits(model, images)) < FP32_TOL
    with pytest.raises(ExportError, match="classifier export"):  # the detector runtimes refuse it in one line
        read_meta(onnx_path)


@needs_tflite
def test_tflite_files_match_torch(tflite_files, fitted, dataset):
    from rtmdet.export.classify import check_images, classifier_runner, load_images, torch_logits
    from rtmdet.data.class_folders import load_class_folders

    model, _ = fitted
    assert set(tflite_files) == {"fp32", "fp16", "int8"}
    canvases = check_images(SIZE).transpose(0, 2, 3, 1)
    val = load_images([im.file for im in load_class_folders(dataset).splits["val"].images], SIZE)
    for precision, path in tflite_files.items():
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["task"] == "classify" and sidecar["precision"] == precision
        assert sidecar["input_layout"] == "NHWC" and sidecar["classes"] == list(CLASSES)
        run, _, _ = classifier_runner(path)
        for name, images in (("canvases", canvases), ("val", val)):
            ref = torch_logits(model, images.transpose(0, 3, 1, 2))
            got = run(images)
            if precision == "int8":
                assert (got.argmax(1) == ref.argmax(1)).mean() >= INT8_AGREEMENT[name], name
            else:
                assert rel_diff(got, ref) < (FP32_TOL if precision == "fp32" else FP16_TOL)
    int8 = json.loads(tflite_files["int8"].with_suffix(".json").read_text())
    assert int8["calibration"]["images"] == 24 and int8["calibration"]["preprocess"] == "resize_center_crop"


@needs_onnx
@needs_tflite
def test_scores_equal_torch(workdir, tflite_files, fitted, dataset):
    from rtmdet.export.classify import score_classifier, score_classifier_export

    model, _ = fitted
    onnx_path = workdir / "onnx" / "cls_nano.onnx"
    if not onnx_path.exists():
        from rtmdet.export.classify import export_classifier_onnx

        export_classifier_onnx(model, onnx_path, CLASSES)
    torch_result = score_classifier(model, dataset, "val")
    assert torch_result.top1 >= 0.75  # fitted (0.875 measured): equal top-1 then means equal predictions
    for path in (onnx_path, tflite_files["fp32"], tflite_files["fp16"]):
        result = score_classifier_export(path, dataset, "val")
        assert result.top1 == torch_result.top1 and result.classes == list(CLASSES)
        assert np.array_equal(result.confusion, torch_result.confusion)
    int8 = score_classifier_export(tflite_files["int8"], dataset, "val")
    assert abs(int8.top1 - torch_result.top1) <= 1 - INT8_AGREEMENT["val"]
