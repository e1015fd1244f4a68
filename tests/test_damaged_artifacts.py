"""Damaged artifacts between stages: one clear line, a non-zero exit, and nothing written.

A truncated or empty checkpoint, ONNX or TFLite file, and a sidecar that does not match its
model, each fed to the next stage's logic (evaluate, export, qat, verify), to `rtmdet.cli.main`
(evaluate, predict, export) and to the stage wrapper `rtmdet.cli.run_stage`. Each must raise a
project error whose message is one line naming the file, and leave no output behind.

ONNX and checkpoints use a 64 px nano and are fast; the TFLite cases share one fp32 export
(~40 s of onnx2tf) and are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import random_detector_checkpoint
from rtmdet.errors import CheckpointError

SIZE = 64
CLASSES = ("cat", "dog")
DAMAGES = ("truncated", "empty")


def _damage(src: Path, dest: Path, how: str) -> Path:
    """A copy of `src` cut to its first half ("truncated") or to nothing ("empty")."""
    data = src.read_bytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")
    return dest


def _write_split(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}
    for i in range(count):
        cv2.imwrite(str(folder / f"im{i}.jpg"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        coco["images"].append({"id": i, "file_name": f"im{i}.jpg", "width": 64, "height": 48})
        coco["annotations"].append({"id": i + 1, "image_id": i, "category_id": i % 2, "bbox": [4, 4, 30, 20],
                                    "area": 600, "iscrowd": 0})
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("damaged")


@pytest.fixture(scope="module")
def data_root(workdir) -> Path:
    root = workdir / "data"
    _write_split(root / "train", 2, seed=1)
    _write_split(root / "valid", 2, seed=2)
    return root


@pytest.fixture(scope="module")
def dataset(data_root):
    from rtmdet.data.coco import load_dataset

    return load_dataset(data_root)


@pytest.fixture(scope="module")
def weights(workdir) -> Path:
    return random_detector_checkpoint(workdir / "models" / "best.pt", classes=CLASSES, image_size=SIZE)


@pytest.fixture(scope="module")
def onnx_file(workdir, weights) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rtmdet.export.command import export_checkpoint

    (path,) = export_checkpoint(weights, "onnx", out=workdir / "export")
    return path


@pytest.fixture(scope="module")
def other_sidecar(workdir, onnx_file) -> Path:
    """The sidecar of another model's export: 3 classes at 96 px."""
    from rtmdet.export.command import export_checkpoint

    other = random_detector_checkpoint(workdir / "other" / "other.pt", classes=("a", "b", "c"), image_size=96)
    (path,) = export_checkpoint(other, "onnx", out=workdir / "other")
    return path.with_suffix(".json")


@pytest.fixture(scope="module")
def tflite_file(workdir, weights) -> Path:
    # find_spec, not importorskip: TensorFlow imported before torchvision.ops crashes the process
    # (see rtmdet.export.tflite._require_onnx2tf); the export does the imports in the safe order.
    if any(importlib.util.find_spec(m) is None for m in ("onnx2tf", "tensorflow")):
        pytest.skip("needs onnx2tf and TensorFlow (the export extra)")
    from rtmdet.export.command import export_checkpoint

    (path,) = export_checkpoint(weights, "tflite", ["fp32"], out=workdir / "tflite")
    return path


def _one_line(exc: BaseException, path: Path) -> str:
    message = str(exc)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


def _cli(argv: list[str], capsys) -> str:
    """Run `rtmdet ARGV` in-process; assert exit 2 and one `error: ` line; return that line."""
    from rtmdet.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _stage(func, capsys, *args, **kwargs) -> str:
    """Run a stage function under `run_stage`; assert exit 2 and one `error: ` line; return it."""
    from rtmdet.cli import run_stage

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_stage(func, *args, **kwargs)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(params=DAMAGES)
def bad_weights(request, weights, tmp_path) -> Path:
    return _damage(weights, tmp_path / "models" / "best.pt", request.param)


def test_damaged_checkpoint_is_one_line(bad_weights):
    from rtmdet.models.checkpoint import load_model

    with pytest.raises(CheckpointError) as info:
        load_model(bad_weights)
    assert "not a readable checkpoint" in _one_line(info.value, bad_weights)


def test_damaged_checkpoint_cli(bad_weights, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    image = data_root / "valid" / "im0.jpg"
    for argv in (["evaluate", "--weights", str(bad_weights), "--data", str(data_root), "--out", str(out)],
                 ["predict", "--weights", str(bad_weights), "--source", str(image), "--out", str(out)],
                 ["export", "--weights", str(bad_weights), "--format", "onnx", "--out", str(out)],
                 ["export", "--weights", str(bad_weights), "--format", "tflite", "--out", str(out)]):
        line = _cli(argv, capsys)
        assert f"{bad_weights}: not a readable checkpoint" in line, (argv, line)
        assert not _files(out), (argv, _files(out))


def test_damaged_checkpoint_stages(bad_weights, dataset, onnx_file, tmp_path, capsys):
    from rtmdet.config import ExportParams, QATParams, TrainParams
    from rtmdet.evaluation.stage import run_evaluation
    from rtmdet.export.command import export_checkpoint
    from rtmdet.export.verify import run_verify
    from rtmdet.quantization.stage import QATOutputs, run_qat

    out = tmp_path / "out"
    stages = [
        (run_evaluation, (bad_weights, dataset, out), {"device": "cpu", "progress": False}),
        (export_checkpoint, (bad_weights, "onnx"), {"out": out / "export"}),
        (run_qat, (bad_weights, dataset, QATParams(workers=0), TrainParams(workers=0), ExportParams()),
         {"out": QATOutputs(out / "qat.pt", out / "qat.tflite", out / "qat.json"), "progress": False}),
        (run_verify, (bad_weights, onnx_file.parent, None, dataset, out / "verify.json"), {"latency_images": 1}),
    ]
    for func, args, kwargs in stages:
        line = _stage(func, capsys, *args, **kwargs)
        assert f"{bad_weights}: not a readable checkpoint" in line, (func.__name__, line)
        assert not _files(out), (func.__name__, _files(out))


@pytest.fixture(scope="module")
def qat_file(workdir, weights) -> Path:
    from rtmdet.models.checkpoint import load_model
    from rtmdet.quantization.export import save_qat
    from rtmdet.quantization.model import prepare_qat

    path = workdir / "qat" / "qat.pt"
    save_qat(prepare_qat(load_model(weights)[0]), path, CLASSES, [0, 1], {})
    return path


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_qat_checkpoint(qat_file, tmp_path, how):
    from rtmdet.quantization.export import load_qat

    load_qat(qat_file)  # the intact file loads
    bad = _damage(qat_file, tmp_path / "qat.pt", how)
    with pytest.raises(CheckpointError) as info:
        load_qat(bad)
    assert "not a readable checkpoint" in _one_line(info.value, bad)


def test_qat_checkpoint_without_model_config(qat_file, tmp_path):
    import torch

    from rtmdet.quantization.export import load_qat

    ckpt = torch.load(qat_file, weights_only=True)
    del ckpt["meta"]["rtmdet"]
    bad = tmp_path / "qat.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError) as info:
        load_qat(bad)
    _one_line(info.value, bad)


def test_qat_checkpoint_of_an_older_simulation_is_refused_in_one_line(qat_file, tmp_path):
    import torch

    from rtmdet.quantization.export import load_qat

    ckpt = torch.load(qat_file, weights_only=True)
    ckpt["meta"]["qat"]["format"] = 1  # before channel attention's gate was simulated as TFLite runs it
    old = tmp_path / "qat.pt"
    torch.save(ckpt, old)
    with pytest.raises(CheckpointError) as info:
        load_qat(old)
    assert "run the qat stage again" in _one_line(info.value, old)


# ---------------------------------------------------------------- exported files


def _export_copy(model: Path, folder: Path, how: str | None = None) -> Path:
    """`model` and its sidecar copied into `folder`, the model damaged by `how` (None: intact)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / model.name
    shutil.copy(model.with_suffix(".json"), dest.with_suffix(".json"))
    if how is None:
        shutil.copy(model, dest)
        return dest
    return _damage(model, dest, how)


def _assert_verify_fails(weights: Path, export_dir: Path, dataset, out: Path, path: Path, expected: str, capsys):
    """verify fails in one line naming `path`, through run_stage too, and writes no verify.json."""
    from rtmdet.export.verify import run_verify

    line = _stage(run_verify, capsys, weights, export_dir, None, dataset, out, latency_images=1)
    assert str(path) in line and expected in line, line
    assert not out.exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_onnx(onnx_file, weights, dataset, tmp_path, how, capsys):
    from rtmdet.export import ExportError, detector_from_export

    bad = _export_copy(onnx_file, tmp_path / "export", how)
    with pytest.raises(ExportError) as info:
        detector_from_export(bad)
    assert f"{bad}: not a readable ONNX model" in _one_line(info.value, bad)
    _assert_verify_fails(weights, bad.parent, dataset, tmp_path / "verify.json", bad, "not a readable ONNX model",
                         capsys)


def test_export_given_as_checkpoint(onnx_file, tmp_path, capsys):
    line = _cli(["predict", "--weights", str(onnx_file), "--source", str(tmp_path), "--out", str(tmp_path / "out")],
                capsys)
    assert f"{onnx_file}: not a readable checkpoint (an exported .onnx model" in line, line


def _edit_sidecar(model: Path, change) -> Path:
    sidecar = model.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    change(meta)
    sidecar.write_text(json.dumps(meta))
    return sidecar


# (name, edit of the sidecar dict, or a file to copy over it, or raw text; expected words)
SIDECAR_CASES = {
    "other_export": ("other", "does not match best.onnx"),
    "classes": (lambda m: m.update(classes=["a", "b", "c"], category_ids=[0, 1, 2]), "3 classes"),
    "image_size": (lambda m: m.update(image_size=128), "image size 128"),
    "output_names": (lambda m: m.update(cls_outputs=["p3", "p4", "p5"]), "p3, p4, p5"),
    "swapped_outputs": (lambda m: m.update(cls_outputs=m["reg_outputs"], reg_outputs=m["cls_outputs"]),
                        "does not match best.onnx"),
    "strides": (lambda m: m.update(strides=[8, 16]), "strides"),
    "format": (lambda m: m.update(format="tflite"), "format is 'tflite'"),
    "classes_null": (lambda m: m.update(classes=None), "classes"),
    "image_size_text": (lambda m: m.update(image_size="64"), "image_size"),
    "not_json": ('{"rtmdet_export": 1, "classes": ["cat", ', "not valid JSON"),
    "empty": ("", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(SIDECAR_CASES))
def test_sidecar_that_does_not_match_the_onnx(case, onnx_file, other_sidecar, weights, dataset, tmp_path, capsys):
    from rtmdet.export import ExportError, detector_from_export

    model = _export_copy(onnx_file, tmp_path / "export")
    edit, expected = SIDECAR_CASES[case]
    sidecar = model.with_suffix(".json")
    if edit == "other":
        shutil.copy(other_sidecar, sidecar)
    elif isinstance(edit, str):
        sidecar.write_text(edit)
    else:
        _edit_sidecar(model, edit)
    with pytest.raises(ExportError) as info:
        detector_from_export(model)
    message = _one_line(info.value, sidecar)
    assert expected in message, message
    _assert_verify_fails(weights, model.parent, dataset, tmp_path / "verify.json", sidecar, expected, capsys)


def test_intact_onnx_still_verifies(onnx_file, weights, dataset, tmp_path):
    from rtmdet.export.verify import run_verify

    model = _export_copy(onnx_file, tmp_path / "export")
    out = tmp_path / "verify.json"
    summary = run_verify(weights, model.parent, None, dataset, out, latency_images=1)
    assert list(summary["formats"]) == ["torch", "onnx"] and out.is_file()


# TFLite: LiteRT does not verify a file before mapping it, so these run in a child process:
# a regression that segfaults must fail this test, not take the whole session down.
STAGE_SCRIPT = """
import sys
from pathlib import Path
from rtmdet.cli import run_stage
from rtmdet.data.coco import load_dataset
from rtmdet.export.verify import run_verify
weights, export_dir, qat_dir, data, out = map(Path, sys.argv[1:6])
run_stage(run_verify, weights, export_dir, qat_dir, load_dataset(data), out, latency_images=1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how,folder", [("truncated", "export"), ("empty", "qat")])  # qat: the QAT int8 file
def test_damaged_tflite(tflite_file, weights, data_root, tmp_path, how, folder):
    bad = _export_copy(tflite_file, tmp_path / folder, how)
    out = tmp_path / "verify.json"
    proc = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(weights), str(tmp_path / "export"),
                           str(tmp_path / "qat"), str(data_root), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{bad}: not a readable TFLite model" in errors[0], proc.stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["classes", "image_size", "output_names", "format"])
def test_sidecar_that_does_not_match_the_tflite(case, tflite_file, weights, dataset, tmp_path, capsys):
    from rtmdet.export import ExportError, detector_from_export

    model = _export_copy(tflite_file, tmp_path / "export")
    detector_from_export(model)  # the intact pair opens
    edit, expected = SIDECAR_CASES[case]
    if case == "format":
        edit, expected = (lambda m: m.update(format="onnx")), "format is 'onnx'"
    sidecar = _edit_sidecar(model, edit)
    with pytest.raises(ExportError) as info:
        detector_from_export(model)
    message = _one_line(info.value, sidecar)
    assert expected in message, message
    _assert_verify_fails(weights, model.parent, dataset, tmp_path / "verify.json", sidecar, expected, capsys)
