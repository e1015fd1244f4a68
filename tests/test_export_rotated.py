"""RTMDet-R (model.task rotate) export, QAT and verify: its ONNX and TFLite files give torch's class
logits, distances and angles per level, their detections through the shared rotated post-process
are torch's, a short QAT run writes qat.pt and its int8 file, and verify scores every format.

The model is a nano RTMDet-R fitted for a few dozen steps on a tiny DOTA-layout dataset (one turned
rectangle per 96 px image, 64 px input), so it finds the boxes and its scores spread from 0 to 1.
One onnx2tf conversion (fp32, fp16 and int8 together, through the `rtmdet export` CLI) is shared by
the TFLite tests and a second one is the QAT run's; they need onnx2tf + TensorFlow and skip without.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_rotated_training import make_rotated_dataset

SIZE = 64
CLASSES = ["tile"]
FIT_STEPS = 150
HAVE_TFLITE = all(importlib.util.find_spec(m) is not None for m in ("onnx2tf", "tensorflow", "onnx"))
needs_tflite = pytest.mark.skipif(not HAVE_TFLITE, reason="needs onnx2tf and TensorFlow (the export extra)")

# Per format and level: max |ours - torch| / max |torch| of the scores (after sigmoid) and of the
# distances, and max |ours - torch| of the angles in radians (what a rotated IoU feels; a level's
# angles can all be near 0, where a relative difference means nothing). Float formats as
# test_export.py's (another runtime's float32 kernels: 1e-4; fp16's 10-bit mantissas: 1e-2, and
# 5e-3 rad on angles under 1).
TOLERANCE = {"onnx": (1e-4, 1e-4, 1e-4), "fp32": (1e-4, 1e-4, 1e-4), "fp16": (1e-2, 1e-2, 5e-3)}
# int8, on the valid images (5 calibration images, 64 px): each level's mean difference instead of
# its largest (same scales). One output step is ~1/255 of an output's range and steps add up over
# the network; the largest differences sit on levels where the fitted model finds nothing (scores
# under 0.01): measured (0.13, 0.05, 0.08 rad), means (0.020, 0.011, 0.0034 rad); the limits leave
# 2.5-3x for another CPU's int8 rounding. A wrong graph is off by the whole scale.
INT8_MEAN_TOLERANCE = (0.05, 0.04, 0.01)
# A confident torch detection's twin: rotated IoU at least this, score within this much.
TWIN = {"onnx": (0.999, 1e-3), "fp32": (0.999, 1e-3), "fp16": (0.98, 0.01), "int8": (0.8, 0.1)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_rotated")


@pytest.fixture(scope="module")
def data_root(workdir) -> Path:
    return make_rotated_dataset(workdir / "data")


@pytest.fixture(scope="module")
def dataset(data_root):
    from rtmdet.data.dota import load_dota

    return load_dota(data_root)


def _letterboxed(records) -> tuple[torch.Tensor, torch.Tensor]:
    """The records' images letterboxed to SIZE [N, 3, S, S] uint8 and their boxes on the canvas [N, 1, 5]."""
    from rtmdet.imageio import read_image
    from rtmdet.inference.preprocess import letterbox

    images, boxes = [], []
    for r in records:
        canvas, info = letterbox(read_image(r.file), SIZE)
        sx, sy = info.scale_wh
        b = np.asarray(r.rboxes, np.float32).copy()
        b[:, [0, 2]] *= sx  # the images are square: one scale, the angle unchanged
        b[:, [1, 3]] *= sy
        images.append(canvas)
        boxes.append(b)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(boxes))


@pytest.fixture(scope="module")
def weights(workdir, dataset) -> Path:
    """A nano RTMDet-R fitted on the train and valid images (full-batch AdamW): it finds the boxes.

    Fitted in float64, so that torch's thread count does not steer the fit: in float32, 60 steps
    gave int8 files whose fidelity swung with it (at 3 threads on one Xeon a valid box's int8 twin
    had rotated IoU 0.69; at 1, 2 and 4, over 0.8). In float64 the int8 differences agree to 1e-6
    at 1 and 4 threads. 150 steps: after 60, the float64 fit did not yet find every valid box."""
    from rtmdet.models.checkpoint import checkpoint_dict, save_atomic
    from rtmdet.models.detector import build_model
    from rtmdet.training.losses import make_priors
    from rtmdet.training.losses_rotated import RotatedRTMDetLoss

    images, rboxes = _letterboxed(dataset.splits["train"].records + dataset.splits["valid"].records)
    labels = torch.zeros(rboxes.shape[:2], dtype=torch.long)
    torch.manual_seed(0)
    model = build_model("nano", len(CLASSES), task="rotate", image_size=SIZE).double()
    criterion = RotatedRTMDetLoss(model.strides)
    priors = make_priors([(SIZE // s, SIZE // s) for s in model.strides], model.strides).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    x, target = model.normalize(images).double(), {"rboxes": rboxes.double(), "labels": labels}
    for _ in range(FIT_STEPS):
        sums = criterion.step_sums(model(x), target, priors)
        loss = criterion.normalize(sums)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = workdir / "models" / "rtmdet_r.pt"
    save_atomic(checkpoint_dict(model.float().eval(), CLASSES, extra_meta={"mmrotate_compatible": True}), path)
    return path


@pytest.fixture(scope="module")
def model(weights):
    from rtmdet.models.checkpoint import load_model

    return load_model(weights, tasks=("rotate",))[0]


@pytest.fixture(scope="module")
def valid_canvases(dataset) -> torch.Tensor:
    return _letterboxed(dataset.splits["valid"].records)[0]


@pytest.fixture(scope="module")
def inputs(valid_canvases) -> torch.Tensor:
    """Fixed noise canvases and the valid images: float formats are compared on both."""
    from rtmdet.export.onnx import fixed_inputs

    return torch.cat([torch.from_numpy(fixed_inputs(SIZE, 2, seed=5)), valid_canvases])


def _diffs(backend, ref_backend, images: torch.Tensor, reduce: str = "max") -> tuple[float, float, float]:
    """Over levels, the largest relative difference of scores and of distances, and the largest
    absolute difference of angles (radians): see TOLERANCE. reduce="mean": each level's mean
    difference in place of its largest (same scales; see INT8_MEAN_TOLERANCE)."""
    (cls, reg, ang), (cls0, reg0, ang0) = backend(images), ref_backend(images)

    def worst(ours, ref, relative=True):
        return max(float(getattr((a - b).abs(), reduce)() / (b.abs().max() if relative else 1))
                   for a, b in zip(ours, ref))

    return (worst([c.sigmoid() for c in cls], [c.sigmoid() for c in cls0]), worst(reg, reg0),
            worst(ang, ang0, relative=False))


def _assert_same_detections(runner, ref_runner, images: list, min_iou: float, score_tol: float) -> None:
    """Each torch detection scoring 0.3 or more has a twin: same class, rotated IoU >= min_iou,
    score within score_tol."""
    from rtmdet.geometry.rotated import rotated_iou

    confident = 0
    for det, ref in zip(runner(images), ref_runner(images)):
        for i in np.flatnonzero(ref.scores >= 0.3):
            confident += 1
            same = np.flatnonzero(det.labels == ref.labels[i])
            assert len(same), "a confident torch detection has no detection of its class"
            ious = rotated_iou(torch.from_numpy(det.rboxes[same]).float(),
                               torch.from_numpy(ref.rboxes[i : i + 1]).float())[:, 0].numpy()
            j = int(ious.argmax())
            assert ious[j] >= min_iou and abs(det.scores[same[j]] - ref.scores[i]) <= score_tol, \
                (ious[j], det.scores[same[j]], ref.scores[i])
    assert confident >= 3, "the fitted model should find each valid image's box"


# ---------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_file(workdir, weights) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rtmdet.export.command import export_checkpoint

    (path,) = export_checkpoint(weights, "onnx", out=workdir / "onnx")
    return path


def test_onnx_gives_torchs_maps_per_level(onnx_file, model, inputs):
    from rtmdet.export.backends import OnnxRuntimeBackend
    from rtmdet.inference.backends import TorchBackend

    diffs = _diffs(OnnxRuntimeBackend(onnx_file), TorchBackend(model), inputs)
    assert all(d <= t for d, t in zip(diffs, TOLERANCE["onnx"])), diffs


def test_onnx_layout_and_sidecar(onnx_file):
    import onnx

    from rtmdet.export.sidecar import read_meta

    graph = onnx.load(str(onnx_file)).graph
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert list(shapes) == ["cls_s8", "cls_s16", "cls_s32", "reg_s8", "reg_s16", "reg_s32",
                            "ang_s8", "ang_s16", "ang_s32"]
    assert shapes["ang_s8"] == [1, 64, 1] and shapes["reg_s32"] == [1, 4, 4] and shapes["cls_s16"] == [1, 16, 1]
    meta = read_meta(onnx_file)
    assert meta.task == "rotate" and meta.angle_outputs == ["ang_s8", "ang_s16", "ang_s32"]
    raw = json.loads(onnx_file.with_suffix(".json").read_text())
    assert "kernel_outputs" not in raw and "angles" in raw["conventions"] and "IoU 0.1" in raw["conventions"]["nms"]


def test_onnx_detections_are_torchs(onnx_file, weights, dataset):
    from rtmdet.export.rotated import rotated_from_checkpoint, rotated_from_export

    runner = rotated_from_export(onnx_file)
    assert runner.class_names == CLASSES and runner.image_size == SIZE
    images = [r.file for r in dataset.splits["valid"].records]
    _assert_same_detections(runner, rotated_from_checkpoint(weights), images, *TWIN["onnx"])


def test_box_detector_refuses_a_rotated_export_in_one_line(onnx_file):
    from rtmdet.export import ExportError, detector_from_export

    with pytest.raises(ExportError, match="RTMDet-R.*rotated_from_export") as info:
        detector_from_export(onnx_file)
    assert "\n" not in str(info.value)


def test_sidecar_without_angles_does_not_fit_the_rotated_onnx(onnx_file, tmp_path):
    from rtmdet.export import ExportError
    from rtmdet.export.rotated import rotated_from_export

    copy = tmp_path / onnx_file.name
    shutil.copy(onnx_file, copy)
    meta = json.loads(onnx_file.with_suffix(".json").read_text())
    meta["angle_outputs"] = ["ang_s8", "ang_s16"]
    copy.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="angle_outputs"):
        rotated_from_export(copy)
    del meta["angle_outputs"]
    copy.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="no angle outputs"):
        rotated_from_export(copy)


# ---------------------------------------------------------------- TFLite


@pytest.fixture(scope="module")
def tflite_files(workdir, weights, data_root) -> dict[str, Path]:
    """fp32, fp16 and int8 through `rtmdet export`, int8 calibrated on 5 images of the DOTA train split."""
    if not HAVE_TFLITE:
        pytest.skip("needs onnx2tf and TensorFlow (the export extra)")
    from rtmdet.cli import main

    out = workdir / "tflite"
    code = main(["export", "--weights", str(weights), "--format", "tflite", "--precision", "fp32", "fp16", "int8",
                 "--data", str(data_root), "--calib-images", "5", "--out", str(out)])
    assert code == 0
    return {p: out / f"rtmdet_r_{p}.tflite" for p in ("fp32", "fp16", "int8")}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tflite_gives_torchs_maps_per_level(tflite_files, model, inputs, valid_canvases, precision):
    """int8 on the valid images only: its ranges were calibrated on flat images with one box each, and
    the noise canvases drive activations far outside them (scores then off by 0.9, as int8 does)."""
    from rtmdet.export.backends import TFLiteBackend
    from rtmdet.inference.backends import TorchBackend

    backend, ref = TFLiteBackend(tflite_files[precision]), TorchBackend(model)
    if precision == "int8":  # by each level's mean difference: see INT8_MEAN_TOLERANCE
        diffs, limits = _diffs(backend, ref, valid_canvases, "mean"), INT8_MEAN_TOLERANCE
    else:
        diffs, limits = _diffs(backend, ref, inputs), TOLERANCE[precision]
    assert all(d <= t for d, t in zip(diffs, limits)), diffs


@pytest.mark.slow
def test_tflite_outputs_are_named_ordered_and_calibrated_on_train(tflite_files, data_root):
    from rtmdet.export.backends import make_interpreter

    for precision, path in tflite_files.items():
        details = make_interpreter(path).get_output_details()
        assert [d["name"] for d in details] == ["cls_s8", "cls_s16", "cls_s32", "reg_s8", "reg_s16", "reg_s32",
                                                "ang_s8", "ang_s16", "ang_s32"], precision
        assert list(details[6]["shape"]) == [1, 8, 8, 1]  # NHWC: the bytes of [1, H*W, 1]
    meta = json.loads(tflite_files["int8"].with_suffix(".json").read_text())
    assert meta["angle_outputs"] == ["ang_s8", "ang_s16", "ang_s32"] and meta["input_layout"] == "NHWC"
    assert meta["calibration"]["images"] == 5 and meta["calibration"]["split"] == "train"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tflite_detections_are_torchs(tflite_files, weights, dataset, precision):
    from rtmdet.export.rotated import rotated_from_checkpoint, rotated_from_export

    images = [r.file for r in dataset.splits["valid"].records]
    _assert_same_detections(rotated_from_export(tflite_files[precision]), rotated_from_checkpoint(weights), images,
                            *TWIN[precision])


def test_outputs_of_one_shape_are_told_apart_by_their_values():
    """A 1-class RTMDet-R's class logits and angles have one shape; the pairing that fits all of
    them wins, even where one output alone would prefer the other's tensor."""
    from rtmdet.export.tflite import match_outputs

    rng = np.random.default_rng(0)
    cls, ang = rng.normal(size=(1, 64, 1)), rng.normal(size=(1, 64, 1))
    ref = {"cls_s8": cls, "ang_s8": ang}
    outs = {"a": ang + 0.01 * cls, "b": cls + 0.3 * ang}  # cls alone correlates a bit with "a" too
    assert match_outputs(outs, ref) == {"cls_s8": "b", "ang_s8": "a"}


# ---------------------------------------------------------------- QAT and verify


@pytest.fixture(scope="module")
def qat_run(workdir, weights, dataset):
    """One QAT epoch on the DOTA train split (the rotate task's pipeline and loss) and its int8 file."""
    if not HAVE_TFLITE:
        pytest.skip("needs onnx2tf and TensorFlow (the export extra)")
    from rtmdet.config import ExportParams, QATParams, TrainParams
    from rtmdet.quantization.stage import QATOutputs, run_qat

    out = QATOutputs(workdir / "qat" / "qat.pt", workdir / "qat" / "model_int8_qat.tflite", workdir / "qat.json")
    metrics = run_qat(weights, dataset, QATParams(epochs=1, batch_size=4, freeze_observers_epoch=0, workers=0),
                      TrainParams(base_batch_size=16, workers=0), ExportParams(calib_images=5), out, device="cpu",
                      progress=False)
    return out, metrics


@pytest.mark.slow
def test_qat_writes_a_rotated_qat_pt_and_its_int8_file(qat_run, dataset):
    from rtmdet.export.sidecar import read_meta
    from rtmdet.quantization.export import load_qat

    out, metrics = qat_run
    model, ckpt = load_qat(out.checkpoint)
    assert model.cfg.task == "rotate" and ckpt["meta"]["dataset_meta"]["classes"] == CLASSES
    assert any(name.startswith("net.bbox_head.rtm_ang.") for name in model.ranges())  # the angles are int8 too
    history = ckpt["meta"]["qat"]["history"]
    assert len(history) == 1 and np.isfinite(history[0]["loss"]) and history[0]["loss_bbox"] > 0
    assert set(metrics["float"]) == {"mAP", "mAP50", "mAP75"} and metrics["float"]["mAP50"] > 0.5
    assert json.loads(out.metrics.read_text()) == metrics
    meta = read_meta(out.tflite)
    assert meta.precision == "int8" and meta.angle_outputs and meta.source["qat"] is True
    # The int8 file computes what the fake-quant model simulates, to a few output steps.
    assert metrics["tflite_vs_fake_quant_mean_steps"] < 3


@pytest.mark.slow
def test_verify_scores_every_format_of_a_rotated_model(onnx_file, tflite_files, qat_run, weights, dataset, workdir):
    from rtmdet.export.verify import VerifyError, run_verify

    folder = workdir / "verify_exports"
    folder.mkdir(exist_ok=True)
    for path in [onnx_file, *tflite_files.values()]:
        for f in (path, path.with_suffix(".json")):
            shutil.copy2(f, folder / f.name)
    out = workdir / "verify.json"
    summary = run_verify(weights, folder, qat_run[0].tflite.parent, dataset, out, latency_images=2, max_drop=0.01,
                         int8_max_drop=0.5)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(summary)) and written["task"] == "rotate"
    rows = written["formats"]
    assert list(rows) == ["torch", "onnx", "tflite_fp32", "tflite_fp16", "tflite_int8", "qat_int8"]
    assert rows["torch"]["mAP50"] > 0.5 and rows["torch"]["drop"] == 0.0
    for name in ("onnx", "tflite_fp32", "tflite_fp16"):  # float formats score what torch scores
        assert abs(rows[name]["drop"]) <= 1e-3, (name, rows[name])
    assert all({"mAP", "mAP50", "mAP75", "size_mb", "latency_ms"} <= set(r) for r in rows.values())
    assert rows["tflite_int8"]["size_mb"] < rows["tflite_fp32"]["size_mb"] / 2.5
    assert "operators" in rows["qat_int8"] and "operators" not in rows["onnx"]
    with pytest.raises(VerifyError, match=r"onnx .*below torch.*verify\.max_drop"):
        run_verify(weights, folder, None, dataset, out, latency_images=1, max_drop=-1.0, int8_max_drop=-1.0)


def test_verify_of_a_rotated_checkpoint_needs_a_dota_dataset(onnx_file, weights, tmp_path):
    from rtmdet.data.records import DetectionDataset
    from rtmdet.export.verify import VerifyError, run_verify

    out = tmp_path / "verify.json"
    with pytest.raises(VerifyError, match="RTMDet-R .*checkpoint, but the dataset given is a detection dataset"):
        run_verify(weights, onnx_file.parent, None, DetectionDataset(CLASSES, [0], {}), out, latency_images=1)
    assert not out.exists()
