"""Export: ONNX and TFLite files agree with torch, export offline and read only the user's
data, and bad requests fail with one clear line.

The ONNX part needs onnx + onnxruntime; the TFLite part onnx2tf + TensorFlow (the `export`
extra). Each part skips cleanly without its packages. One onnx2tf conversion (fp32, fp16 and
int8 together, ~40 s) is shared by the TFLite tests; a second one checks uint8 I/O.
"""

from __future__ import annotations

import importlib.util

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import max_rel_diff, random_detector_checkpoint
from rtmdet.errors import RTMDetError

SIZE = 64
CLASSES = ("cat", "dog")
# Per format, per tensor: max |ours - torch| / max |torch| of the scores (after sigmoid) and of the
# box distances. Measured here: ONNX 1.3e-6 / 1.1e-6 and TFLite fp32 2.5e-6 / 2.6e-6 (another
# runtime's float32 kernels: 1e-4 leaves 40x for another CPU, and a wrong op is far above it);
# fp16 1.7e-3 / 2.0e-3 (10-bit mantissas through the network: 1e-2); int8 0.066 / 0.031 at 64 px
# with 5 calibration images (one quantization step of an output is ~1/60 of its range and steps
# add up over the network; another CPU's int8 kernels can round one step differently: 0.15 / 0.08;
# the verify stage judges int8 by mAP instead).
TOLERANCE = {"onnx": (1e-4, 1e-4), "fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2), "int8": (0.15, 0.08)}

GUARD = r'''
import json, sys
log = open(sys.argv[1], "w")
def remote(address):
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str) or host.startswith(("/", "127.")):  # unix sockets, loopback
        return False
    return host not in ("", "localhost", "::1", "::", "0.0.0.0")
def hook(event, args):
    # Binding to loopback (urllib3 probes IPv6 so at import) is no network use; reaching out is.
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg") and remote(args[1]) or \
            event in ("socket.getaddrinfo", "socket.gethostbyname") and remote(args[0]):
        log.write(json.dumps(["net", event, repr(args)[:200]]) + "\n"); log.flush()
        raise OSError("network disabled by test_export")
    if event == "open" and isinstance(args[0], str):
        log.write(json.dumps(["open", args[0]]) + "\n")
sys.addaudithook(hook)
import argparse
from rtmdet.export import command
parser = argparse.ArgumentParser()
command.add_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[2:])
sys.exit(args.func(args))
'''


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    img[:2, :2], img[-2:, -2:] = 0, 255  # the full pixel range, as real photos have
    return img


def _write_split(folder: Path, sizes: list[tuple[int, int]], seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}
    for i, (w, h) in enumerate(sizes):
        cv2.imwrite(str(folder / f"im{i}.jpg"), _smooth_image(rng, h, w))
        coco["images"].append({"id": i, "file_name": f"im{i}.jpg", "width": w, "height": h})
        coco["annotations"].append({"id": i + 1, "image_id": i, "category_id": i % 2,
                                    "bbox": [4, 4, w // 2, h // 2], "area": w * h / 4, "iscrowd": 0})
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    root = workdir / "data"
    _write_split(root / "train", [(96, 64), (64, 80), (120, 90), (64, 64), (50, 100), (80, 60)], seed=1)
    _write_split(root / "valid", [(100, 70), (64, 96)], seed=2)
    return root


def _lively(model, images: torch.Tensor) -> None:
    """Make a random model's outputs depend on its input (random init is nearly constant):
    BN statistics from real images, BN scale 0.7 (well conditioned), spread head predictors."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(model.normalize(images))
        model.eval()
        for bn in bns:
            bn.weight.mul_(0.7)
        cls, reg = model(model.normalize(images))
        for lvl, stride in enumerate(model.strides):
            for conv, out, mean, std in ((model.bbox_head.rtm_cls[lvl], cls[lvl], -2.0, 1.5),
                                         (model.bbox_head.rtm_reg[lvl], reg[lvl] / stride, 2.0, 0.8)):
                raw = out - conv.bias.view(1, -1, 1, 1)
                k = std / raw.std(dim=(0, 2, 3)).clamp_min(1e-6)
                conv.weight.mul_(k.view(-1, 1, 1, 1))
                conv.bias.copy_(mean - raw.mean(dim=(0, 2, 3)) * k)


@pytest.fixture(scope="module")
def weights(workdir, dataset) -> Path:
    from rtmdet.imageio import list_images, read_image
    from rtmdet.inference.preprocess import letterbox, to_chw_tensor
    from rtmdet.models.checkpoint import checkpoint_dict, load_model, save_atomic

    path = random_detector_checkpoint(workdir / "nano.pt", classes=CLASSES, image_size=SIZE, category_ids=[0, 1])
    model, _ = load_model(path)
    images = to_chw_tensor([letterbox(read_image(f), SIZE)[0] for f in list_images(dataset / "train")])
    _lively(model, images)
    save_atomic(checkpoint_dict(model, list(CLASSES), [0, 1]), path)
    return path


@pytest.fixture(scope="module")
def torch_detector(weights):
    from rtmdet.inference import Detector

    return Detector.from_checkpoint(weights, score_thr=0.05)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    from rtmdet.export.onnx import fixed_inputs

    return torch.from_numpy(fixed_inputs(SIZE, 3, seed=5))


def _max_diffs(backend, ref_backend, images: torch.Tensor) -> tuple[float, float]:
    """Per level, max |ours - torch| / max |torch| of the scores (after sigmoid) and of the box
    distances; the largest over levels."""
    (cls, reg), (cls0, reg0) = backend(images), ref_backend(images)
    score = max_rel_diff([c.sigmoid() for c in cls], [c.sigmoid() for c in cls0])
    box = max_rel_diff(reg, reg0)
    return score, box


def _assert_same_detections(det, ref, box_tol: float, score_tol: float, min_twins: float = 1.0) -> None:
    """Each confident torch detection has a twin: same class, box within box_tol of the image's
    longer side, score within score_tol (scores are at most 1: absolute is relative). With
    min_twins < 1, at least that fraction of them, the most confident one always: int8 shifts a
    random model's many near-duplicate boxes a little, and NMS can then keep the other one of a pair
    (on one CPU 1 of 26 confident detections lost its twin, on another none; the raw outputs are held to
    their tolerance by test_tflite_agrees_with_torch)."""
    box_tol = box_tol * max(ref.image_hw)
    keep = np.flatnonzero(ref.scores >= 0.3)
    assert len(keep) > 0, "the test model should make confident detections"
    twins = []
    for i in keep:
        same = det.labels == ref.labels[i]
        if not same.any():
            twins.append(False)
            continue
        dist = np.abs(det.boxes[same] - ref.boxes[i]).max(axis=1) + np.abs(det.scores[same] - ref.scores[i])
        j = int(dist.argmin())
        twins.append(bool(np.abs(det.boxes[same][j] - ref.boxes[i]).max() <= box_tol
                          and abs(det.scores[same][j] - ref.scores[i]) <= score_tol))
    twins = np.array(twins)
    assert twins[int(ref.scores[keep].argmax())], "the most confident torch detection has no twin"
    assert twins.mean() >= min_twins, f"{twins.sum()} of {len(twins)} confident detections have a twin"


# ---------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_file(workdir, weights) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rtmdet.export.command import export_checkpoint

    (path,) = export_checkpoint(weights, "onnx", out=workdir / "onnx")
    return path


def test_onnx_agrees_with_torch(onnx_file, weights, inputs):
    from rtmdet.export.backends import OnnxRuntimeBackend
    from rtmdet.inference.backends import TorchBackend
    from rtmdet.models.checkpoint import load_model

    backend = OnnxRuntimeBackend(onnx_file)
    score, box = _max_diffs(backend, TorchBackend(load_model(weights)[0]), inputs)
    assert score <= TOLERANCE["onnx"][0] and box <= TOLERANCE["onnx"][1]
    assert backend.static_batch == 1  # a static file still takes a batch of 3, in chunks


def test_onnx_detections_match_torch(onnx_file, torch_detector, dataset):
    from rtmdet.export import detector_from_export

    detector = detector_from_export(onnx_file, score_thr=0.05)
    assert detector.class_names == list(CLASSES) and detector.image_size == SIZE
    for image in sorted((dataset / "valid").glob("*.jpg")):
        _assert_same_detections(detector(image), torch_detector(image), *TOLERANCE["onnx"][::-1])


def test_onnx_layout_sidecar_and_deterministic_bytes(onnx_file, weights, tmp_path):
    import onnx

    from rtmdet.export.command import export_checkpoint

    meta = json.loads(onnx_file.with_suffix(".json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["image_size"] == SIZE and meta["strides"] == [8, 16, 32]
    assert meta["input_layout"] == "NCHW" and meta["input_dtype"] == "float32"
    model = onnx.load(str(onnx_file))
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert shapes == {"cls_s8": [1, 64, 2], "cls_s16": [1, 16, 2], "cls_s32": [1, 4, 2],
                      "reg_s8": [1, 64, 4], "reg_s16": [1, 16, 4], "reg_s32": [1, 4, 4]}
    assert model.opset_import[0].version >= 17
    (again,) = export_checkpoint(weights, "onnx", out=tmp_path)
    assert again.read_bytes() == onnx_file.read_bytes()
    assert again.with_suffix(".json").read_bytes() == onnx_file.with_suffix(".json").read_bytes()


def test_onnx_dynamic_batch(weights, tmp_path, inputs):
    pytest.importorskip("onnxruntime")
    from rtmdet.export.backends import OnnxRuntimeBackend
    from rtmdet.export.command import export_checkpoint
    from rtmdet.inference.backends import TorchBackend
    from rtmdet.models.checkpoint import load_model

    (path,) = export_checkpoint(weights, "onnx", out=tmp_path, dynamic_batch=True)
    backend = OnnxRuntimeBackend(path)
    assert backend.static_batch is None and backend.meta.dynamic_batch
    score, box = _max_diffs(backend, TorchBackend(load_model(weights)[0]), inputs)
    assert score <= TOLERANCE["onnx"][0] and box <= TOLERANCE["onnx"][1]


# ---------------------------------------------------------------- errors


def _export_error(argv: list[str]) -> str:
    import argparse

    from rtmdet.export import command

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", *argv])
    with pytest.raises(RTMDetError) as info:
        args.func(args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_are_one_clear_line(weights, dataset, tmp_path):
    assert "checkpoint file not found" in _export_error(["--weights", str(tmp_path / "no.pt"), "--format", "onnx"])
    w = ["--weights", str(weights)]
    assert "not a positive multiple of 32" in _export_error([*w, "--format", "onnx", "--imgsz", "100"])
    assert "needs --data" in _export_error([*w, "--format", "tflite", "--precision", "int8"])
    assert "fp32 only" in _export_error([*w, "--format", "onnx", "--precision", "fp16"])
    assert "ONNX only" in _export_error([*w, "--format", "tflite", "--dynamic-batch"])
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    for image in (broken / "train").glob("*.jpg"):
        image.write_bytes(b"not an image")
    message = _export_error([*w, "--format", "tflite", "--precision", "int8", "--data", str(broken)])
    assert "no readable calibration image" in message


def test_missing_onnx2tf_names_the_install_command(weights, monkeypatch):
    from rtmdet.export import ExportError
    from rtmdet.export.tflite import export_tflite
    from rtmdet.models.checkpoint import load_model

    monkeypatch.setitem(sys.modules, "onnx2tf", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"onnx2tf is not installed.*pip install"):
        export_tflite(load_model(weights)[0], "unused", ["fp32"])


def test_missing_sidecar_is_an_error(onnx_file, tmp_path):
    from rtmdet.export import ExportError, detector_from_export

    lonely = tmp_path / "model.onnx"
    shutil.copy(onnx_file, lonely)
    with pytest.raises(ExportError, match="sidecar not found"):
        detector_from_export(lonely)


# ---------------------------------------------------------------- TFLite


def _offline_prefix() -> list[str]:
    """`unshare -n` (a process with no network at all) where allowed; the audit guard always."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


@pytest.fixture(scope="module")
def tflite_files(workdir, weights, dataset) -> dict:
    # find_spec, not importorskip: TensorFlow imported before torchvision.ops crashes the process
    # (see rtmdet.export.tflite._require_onnx2tf); the export does the imports in the safe order.
    if any(importlib.util.find_spec(m) is None for m in ("onnx2tf", "tensorflow")):
        pytest.skip("needs onnx2tf and TensorFlow (the export extra)")
    out, log = workdir / "tflite", workdir / "audit.log"
    script = workdir / "offline_export.py"
    script.write_text(GUARD)
    dead = "http://127.0.0.1:9"  # the discard port: any proxied request fails at once
    env = {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead, "NO_PROXY": ""}
    cmd = [*_offline_prefix(), sys.executable, str(script), str(log), "export", "--weights", str(weights),
           "--format", "tflite", "--precision", "fp32", "fp16", "int8", "--data", str(dataset),
           "--calib-images", "5", "--out", str(out)]
    before = set(os.listdir(workdir))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    litter = set(os.listdir(workdir)) - before - {"tflite", "audit.log"}
    return {"out": out, "events": events, "stdout": proc.stdout, "litter": litter,
            **{p: out / f"nano_{p}.tflite" for p in ("fp32", "fp16", "int8")}}



@pytest.mark.slow
def test_tflite_export_is_offline_and_reads_only_the_users_data(tflite_files, dataset, workdir):
    events = tflite_files["events"]
    assert not [e for e in events if e[0] == "net"], "export tried to use the network"
    opened = [Path(e[1]) for e in events if e[0] == "open"]
    images = [p for p in opened if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp")]
    assert images and all(dataset / "train" in p.parents for p in images)
    assert not [p for p in opened if "calibration_image_sample_data" in p.name]
    assert not [p for p in opened if p.suffix == ".npy" and "rtmdet-onnx2tf-" not in str(p)]
    assert not tflite_files["litter"], "export wrote outside its output folder"
    for precision in ("fp32", "fp16", "int8"):
        assert tflite_files[precision].is_file() and tflite_files[precision].with_suffix(".json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tflite_agrees_with_torch(tflite_files, weights, inputs, precision):
    from rtmdet.export.backends import TFLiteBackend
    from rtmdet.inference.backends import TorchBackend
    from rtmdet.models.checkpoint import load_model

    backend = TFLiteBackend(tflite_files[precision])
    score, box = _max_diffs(backend, TorchBackend(load_model(weights)[0]), inputs)
    assert score <= TOLERANCE[precision][0] and box <= TOLERANCE[precision][1], (score, box)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tflite_detections_match_torch(tflite_files, torch_detector, dataset, precision):
    from rtmdet.export import detector_from_export

    detector = detector_from_export(tflite_files[precision], score_thr=0.05)
    score_tol, box_tol = TOLERANCE[precision]
    min_twins = 0.8 if precision == "int8" else 1.0
    for image in sorted((dataset / "valid").glob("*.jpg")):
        _assert_same_detections(detector(image), torch_detector(image), box_tol, score_tol, min_twins)


@pytest.mark.slow
def test_tflite_operator_lists(tflite_files):
    from rtmdet.export.backends import tflite_operators

    fp32, int8 = tflite_operators(tflite_files["fp32"]), tflite_operators(tflite_files["int8"])
    assert fp32["CONV_2D"] > 20 and "DEPTHWISE_CONV_2D" in fp32
    # ReLU6 folds into the convolutions: no LOGISTIC (SiLU's sigmoid) for a microcontroller runtime.
    assert "LOGISTIC" not in int8 and "QUANTIZE" in int8
    assert sum(int8.values()) >= sum(fp32.values())  # the same graph plus (de)quantize at the edges


def test_tflite_outputs_are_named_and_ordered(tflite_files):
    from rtmdet.export.backends import make_interpreter

    for precision in ("fp32", "fp16", "int8"):
        interp = make_interpreter(tflite_files[precision])
        names = [d["name"] for d in interp.get_output_details()]
        assert names == ["cls_s8", "cls_s16", "cls_s32", "reg_s8", "reg_s16", "reg_s32"]
        shapes = [list(d["shape"]) for d in interp.get_output_details()]
        assert shapes[0] == [1, 8, 8, 2] and shapes[5] == [1, 2, 2, 4]  # NHWC: the bytes of [1, H*W, C]
        signature = interp.get_signature_list()["serving_default"]
        assert sorted(signature["outputs"]) == sorted(names)
        (inp,) = interp.get_input_details()
        assert inp["name"] == "images" and list(inp["shape"]) == [1, SIZE, SIZE, 3]
    meta = json.loads(tflite_files["int8"].with_suffix(".json").read_text())
    assert meta["calibration"]["images"] == 5 and meta["calibration"]["split"] == "train"
    assert meta["input_layout"] == "NHWC"


@pytest.mark.slow
def test_int8_with_uint8_io_takes_raw_pixels(tflite_files, weights, dataset, tmp_path, inputs):
    from rtmdet.export.backends import TFLiteBackend
    from rtmdet.export.tflite import calibration_files, export_tflite, load_calibration
    from rtmdet.inference.backends import TorchBackend
    from rtmdet.models.checkpoint import load_model

    model = load_model(weights)[0]
    calib, files = load_calibration(calibration_files(dataset, 5), SIZE)
    (result,) = export_tflite(model, tmp_path, ["int8"], calibration=calib, calib_files=files, int8_io="uint8")
    assert result.path.name == "model_int8_uint8io.tflite"
    meta = result.meta
    assert meta.input_dtype == "uint8" and meta.input_quant == [1.0, 0]  # raw pixels, exactly
    assert meta.output_dtype == "uint8" and set(meta.output_quant) == set(meta.cls_outputs + meta.reg_outputs)
    backend = TFLiteBackend(result.path)
    score, box = _max_diffs(backend, TorchBackend(model), inputs)
    assert score <= TOLERANCE["int8"][0] and box <= TOLERANCE["int8"][1], (score, box)
    # same quantized network as the float-I/O file: only the I/O conversion differs
    s, b = _max_diffs(backend, TFLiteBackend(tflite_files["int8"]), inputs)
    assert s <= 1e-3 and b <= 1e-3  # measured 0 and 0: the same int8 arithmetic inside


# The verify stage's logic over the files exported above.


@pytest.mark.slow
def test_verify_scores_every_format_and_fails_on_drift(onnx_file, tflite_files, weights, dataset, workdir):
    from rtmdet.data.coco import load_dataset
    from rtmdet.export.verify import VerifyError, find_exports, run_verify

    folder = workdir / "verify_exports"
    folder.mkdir(exist_ok=True)
    for path in [onnx_file, *(tflite_files[p] for p in ("fp32", "fp16", "int8"))]:
        for f in (path, path.with_suffix(".json")):
            shutil.copy2(f, folder / f.name)
    found = find_exports(folder)
    assert sorted(found) == ["onnx", "tflite_fp16", "tflite_fp32", "tflite_int8"]
    data = load_dataset(dataset)
    out = workdir / "verify.json"
    summary = run_verify(weights, folder, None, data, out, latency_images=2, max_drop=0.01, int8_max_drop=0.2)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(summary))
    rows = written["formats"]
    assert list(rows) == ["torch", "onnx", "tflite_fp32", "tflite_fp16", "tflite_int8"]
    assert rows["torch"]["drop"] == 0.0
    for name in ("onnx", "tflite_fp32"):  # float formats score what torch scores
        assert abs(rows[name]["drop"]) <= 1e-3, (name, rows[name])
    assert rows["tflite_int8"]["size_mb"] < rows["tflite_fp32"]["size_mb"] / 3
    assert all(r["latency_ms"] > 0 for r in rows.values())
    # A limit every format breaks: one clear line naming the formats, after verify.json is written.
    out.unlink()
    with pytest.raises(VerifyError, match=r"onnx .*below torch.*verify\.max_drop"):
        run_verify(weights, folder, None, data, out, latency_images=1, max_drop=-1.0, int8_max_drop=-1.0)
    assert out.is_file()
