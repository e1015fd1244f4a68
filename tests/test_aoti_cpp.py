"""AOTInductor export and the C++ runner (cpp/): a `.pt2` run through AotiBackend and through
rtmdet_run gives Detector's detections on real photos, and bad inputs fail with one clear line,
in Python and in C++.

The AOTI compile and the C++ build happen once each, in module/session fixtures. The C++ tests
skip without cmake, a C++ compiler or OpenCV, unless RTMDET_REQUIRE_CPP=1 (CI), which makes a
runner that cannot build a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, random_detector_checkpoint

SIZE = 128
CLASSES = ("circle", "square", "triangle", "cross")
# A lively random model's scores spread around sigmoid(-2.5); 0.05 keeps a few hundred candidates
# per photo, so NMS has work to do and the comparison is not vacuous.
SCORE = 0.05
# fp32 on both sides: Inductor's fused kernels and eager torch round differently, ~1e-6 of a raw
# output here (eager float32 is as far from float64); 0.5 px and 1e-4 leave two orders of
# magnitude, and a wrong pre- or post-process step is off by whole pixels.
BOX_TOL, SCORE_TOL = 0.5, 1e-4


# ---------------------------------------------------------------- fixtures


def _liven(model, images: torch.Tensor) -> None:
    """Make a random model's outputs depend on its input: BN statistics from the photos, BN scale
    0.7 (without it float32 rounding grows through the layers to 1e-4 of the logits, in eager torch
    as in Inductor; with it 1e-6), class logits spread around -2.5 (std 1.5) so that many (cell,
    class) pairs pass SCORE."""
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
        cls, _ = model(model.normalize(images))
        for conv, out in zip(model.bbox_head.rtm_cls, cls):
            raw = out - conv.bias.view(1, -1, 1, 1)
            k = 1.5 / raw.std(dim=(0, 2, 3)).clamp_min(1e-6)
            conv.weight.mul_(k.view(-1, 1, 1, 1))
            conv.bias.copy_(-2.5 - raw.mean(dim=(0, 2, 3)) * k)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aoti")


@pytest.fixture(scope="module")
def photos(workdir) -> list[Path]:
    """Two synthetic JPEG photos (240-400 px, shrunk into the canvas), a small wide PNG (enlarged)
    and a PNG of exactly twice the canvas (OpenCV's 2x shortcut): every letterbox path."""
    from rtmdet.data.synthetic import make_synthetic_dataset
    from rtmdet.imageio import list_images, read_image

    root = make_synthetic_dataset(workdir / "shapes", seed=3, train=2, valid=1, empty_fraction=0.0)
    files = list_images(root / "train")
    image = read_image(files[0])
    cv2.imwrite(str(workdir / "wide.png"), cv2.resize(image, (100, 37), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(workdir / "double.png"), cv2.resize(image, (2 * SIZE, 2 * SIZE * 3 // 4)))
    return [*files, workdir / "wide.png", workdir / "double.png"]


@pytest.fixture(scope="module")
def weights(workdir, photos) -> Path:
    from rtmdet.imageio import read_image
    from rtmdet.inference.preprocess import letterbox, to_chw_tensor
    from rtmdet.models.checkpoint import checkpoint_dict, load_model, save_atomic

    path = random_detector_checkpoint(workdir / "nano.pt", classes=CLASSES, image_size=SIZE)
    model, _ = load_model(path)
    _liven(model, to_chw_tensor([letterbox(read_image(f), SIZE)[0] for f in photos]))
    save_atomic(checkpoint_dict(model, list(CLASSES)), path)
    return path


@pytest.fixture(scope="module")
def package(weights, workdir) -> Path:
    from rtmdet.export.command import export_checkpoint

    (path,) = export_checkpoint(weights, "aoti", out=workdir / "aoti")
    return path


@pytest.fixture(scope="module")
def torch_detector(weights):
    from rtmdet.inference import Detector

    return Detector.from_checkpoint(weights, fast=False, score_thr=SCORE)


def _unavailable(why: str):
    if os.environ.get("RTMDET_REQUIRE_CPP") == "1":
        pytest.fail(f"RTMDET_REQUIRE_CPP=1, but the C++ runner cannot be built: {why}")
    pytest.skip(f"C++ runner not built: {why}")


@pytest.fixture(scope="session")
def runner(tmp_path_factory) -> Path:
    """cpp/'s rtmdet_run, configured and built once per session in a temporary folder."""
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    if missing:
        _unavailable(f"{', '.join(missing)} not found")
    build = tmp_path_factory.mktemp("cpp-build")
    configure = subprocess.run(
        ["cmake", "-S", str(REPO / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         f"-DTORCH_ROOT={Path(torch.__file__).parent}", f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"],
        capture_output=True, text=True)
    if configure.returncode:
        if "rtmdet_run needs OpenCV" in configure.stderr:
            _unavailable("OpenCV (core, imgproc, imgcodecs) not found")
        pytest.fail(f"cmake could not configure cpp/:\n{configure.stdout[-2000:]}\n{configure.stderr[-4000:]}")
    jobs = os.environ.get("RTMDET_BUILD_JOBS") or str(min(2, os.cpu_count() or 1))
    built = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True)
    if built.returncode:
        pytest.fail(f"cpp/ does not build:\n{built.stdout[-6000:]}\n{built.stderr[-4000:]}")
    return build / "rtmdet_run"


def _run_cpp(runner: Path, model: Path, image: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), str(model), str(image), "--threads", str(torch.get_num_threads()), *flags],
                          capture_output=True, text=True, timeout=300)


def _cpp_detections(runner: Path, model: Path, image: Path, *flags: str) -> dict:
    proc = _run_cpp(runner, model, image, *flags)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- comparison


def _assert_same(boxes, scores, labels, ref) -> None:
    """Same count and labels; each reference detection has its own twin of its class with the box
    within BOX_TOL px and the score within SCORE_TOL (near-equal scores may swap places)."""
    boxes, scores, labels = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores), np.asarray(labels)
    assert len(scores) == len(ref), f"{len(scores)} detections, the reference has {len(ref)}"
    assert sorted(labels.tolist()) == sorted(ref.labels.tolist())
    free = np.ones(len(scores), bool)
    for box, score, label in zip(ref.boxes, ref.scores, ref.labels):
        same = np.flatnonzero(free & (labels == label))
        gap = np.abs(boxes[same] - box).max(axis=1)
        j = same[int(gap.argmin())]
        assert gap.min() <= BOX_TOL and abs(scores[j] - score) <= SCORE_TOL, (
            f"no twin for {CLASSES[label]} {score:.5f} {box.tolist()}: nearest {scores[j]:.5f} {boxes[j].tolist()}")
        free[j] = False


# ---------------------------------------------------------------- Python: export and AotiBackend


def test_aoti_sidecar_states_the_contract(package):
    meta = json.loads(package.with_suffix(".json").read_text())
    assert meta["format"] == "aoti" and meta["device"] == "cpu" and meta["image_size"] == SIZE
    assert meta["classes"] == list(CLASSES) and meta["strides"] == [8, 16, 32]
    assert meta["outputs"] == ["cls_s8", "cls_s16", "cls_s32", "reg_s8", "reg_s16", "reg_s32"]
    assert meta["input_name"] == "images" and meta["input_layout"] == "NCHW" and meta["input_dtype"] == "float32"
    assert meta["postprocess"] == {"score_thr": 0.001, "nms_pre": 30000, "iou_thr": 0.65, "max_per_img": 300,
                                   "min_bbox_size": 0.0}
    assert {"input", "letterbox", "layout", "reg", "cls", "postprocess"} <= set(meta["conventions"])
    assert meta["normalization"] in ("imagenet", "unit") and len(meta["mean"]) == len(meta["std"]) == 3


def test_other_formats_sidecars_keep_their_fields():
    """The aoti-only fields stay out of ONNX/TFLite sidecars (their bytes are DVC-cached)."""
    from rtmdet.export.sidecar import ExportMeta

    meta = ExportMeta(format="onnx", precision="fp32", classes=["a"], category_ids=[0], image_size=64,
                      strides=[8, 16, 32], normalization="imagenet", mean=[0.0] * 3, std=[1.0] * 3)
    d = json.loads(meta.to_json())
    assert not {"outputs", "device", "postprocess"} & set(d) and "letterbox" not in d["conventions"]


def test_aoti_detections_match_torch(package, torch_detector, photos):
    from rtmdet.inference import Detector

    detector = Detector.from_file(package, score_thr=SCORE)
    for photo in photos:
        ref, det = torch_detector(photo), detector(photo)
        assert len(ref) >= 3, f"{photo.name}: the test model should make several detections"
        _assert_same(det.boxes, det.scores, det.labels, ref)


def test_predict_runs_a_package(package, photos, tmp_path, capsys):
    from rtmdet.cli import main

    code = main(["predict", "--weights", str(package), "--source", str(photos[2]), "--out", str(tmp_path),
                 "--score-thr", str(SCORE)])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads((tmp_path / "predictions.json").read_text())) >= 3


def _bad_files(tmp: Path, package: Path) -> dict[str, Path]:
    """Broken models beside good sidecars, a lonely package, unreadable photos."""
    sidecar = package.with_suffix(".json").read_text()
    files = {"missing": tmp / "missing.pt2", "text": tmp / "notes.pt2", "truncated": tmp / "cut.pt2",
             "onnx": tmp / "model.onnx", "lonely": tmp / "lonely" / "model.pt2",
             "no_image": tmp / "missing.jpg", "corrupt_image": tmp / "corrupt.jpg", "empty_image": tmp / "empty.png"}
    files["text"].write_text("a text file, not a model\n")
    data = package.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["onnx"].write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x052.1.0")  # how an ONNX protobuf starts
    for name in ("text", "truncated", "onnx"):
        files[name].with_suffix(".json").write_text(sidecar)
    files["onnx"].with_suffix(".json").write_text(sidecar.replace('"format": "aoti"', '"format": "onnx"'))
    files["lonely"].parent.mkdir()
    shutil.copy(package, files["lonely"])
    files["corrupt_image"].write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    files["empty_image"].write_bytes(b"")
    return files


# (model, image) -> what the one line says (a regular expression); "good": the real package or photo.
BAD_INPUTS = [
    ("missing", "good", "exported model not found"),
    ("text", "good", "not an AOTInductor package"),
    ("truncated", "good", "not a loadable AOTInductor package"),
    ("lonely", "good", "sidecar not found"),
    ("good", "no_image", "image file not found|no such image file"),  # predict checks --source first
    ("good", "corrupt_image", "not a readable image"),
    ("good", "empty_image", "image file is empty"),
]


def _one_line(stderr: str, says: str) -> bool:
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and re.search(says, lines[0]) is not None


@pytest.mark.parametrize("model, image, says", BAD_INPUTS)
def test_predict_bad_input_is_one_clear_line(package, photos, tmp_path, capsys, model, image, says):
    from rtmdet.cli import main

    files = _bad_files(tmp_path, package)
    model_path = package if model == "good" else files[model]
    image_path = photos[0] if image == "good" else files[image]
    code = main(["predict", "--weights", str(model_path), "--source", str(image_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and _one_line(err, says), err


def test_export_refusals_are_one_clear_line(weights, tmp_path, capsys):
    from rtmdet.cli import main
    from rtmdet.models import build_model
    from rtmdet.models.checkpoint import checkpoint_dict, save_atomic

    segment = tmp_path / "segment.pt"
    save_atomic(checkpoint_dict(build_model("nano", 2, task="segment", image_size=64), ["a", "b"]), segment)
    cases = [(["--weights", str(tmp_path / "none.pt")], "checkpoint file not found"),
             (["--weights", str(weights), "--precision", "fp16"], "fp32 only"),
             (["--weights", str(weights), "--dynamic-batch"], "one image at a time"),
             (["--weights", str(segment)], "box models (task detect) only")]
    for args, says in cases:
        code = main(["export", "--format", "aoti", "--out", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert code != 0 and _one_line(err, re.escape(says)), (args, err)


def _crashing_compiler(folder: Path) -> Path:
    """A g++ whose packages crash as they load: it links an object that raises SIGSEGV in its
    constructor into the package's wrapper library (torch's runtime dlopens it)."""
    source = folder / "boom.cpp"
    source.write_text("#include <csignal>\n__attribute__((constructor)) static void boom() { std::raise(SIGSEGV); }\n")
    subprocess.run(["g++", "-fPIC", "-c", str(source), "-o", str(folder / "boom.o")], check=True)
    script = folder / "crashing-g++"
    script.write_text("#!/bin/sh\n"
                      f'for a in "$@"; do case "$a" in *wrapper.so) exec g++ "$@" {folder / "boom.o"} ;; esac; done\n'
                      'exec g++ "$@"\n')
    script.chmod(0o755)
    return script


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_export_builds_again_when_the_package_crashes_as_it_loads(weights, tmp_path, monkeypatch, caplog):
    """$CXX's packages crash in torch's loader (as /opt/gcc/bin/g++'s did on the H200 machine):
    the export builds the package again with the next compiler and says so; with no
    other compiler it fails with one line and writes nothing."""
    import logging

    import rtmdet.export.aoti as aoti
    from rtmdet.export import ExportError
    from rtmdet.models.checkpoint import load_model

    bad = _crashing_compiler(tmp_path)
    monkeypatch.setenv("CXX", str(bad))
    model, _ = load_model(weights)
    assert aoti.compilers()[0] == str(bad) and len(aoti.compilers()) > 1
    with caplog.at_level(logging.WARNING, logger="rtmdet.export.aoti"):
        result = aoti.export_aoti(model, tmp_path / "ok" / "m.pt2")
    assert any("crashed as it loaded" in r.getMessage() and str(bad) in r.getMessage() for r in caplog.records)
    assert result.path.is_file() and max(result.max_diff.values()) < 1e-3

    monkeypatch.setattr(aoti, "compilers", lambda: [str(bad)])
    with pytest.raises(ExportError, match=f"crashed loading the package for cpu built with each C\\+\\+ compiler found here \\({re.escape(str(bad))}\\)"):
        aoti.export_aoti(model, tmp_path / "bad" / "m.pt2")
    assert not any((tmp_path / "bad").iterdir())


# ---------------------------------------------------------------- C++: rtmdet_run


def test_cpp_letterbox_is_bit_exact(runner, package, photos, tmp_path):
    """The canvas the C++ runner feeds the model is Python's letterbox, byte for byte."""
    from rtmdet.imageio import read_image
    from rtmdet.inference.preprocess import letterbox

    for photo in photos:
        dump = tmp_path / f"{photo.stem}.canvas"
        _cpp_detections(runner, package, photo, "--dump-canvas", str(dump), "--score-thr", "0.9")
        canvas = np.frombuffer(dump.read_bytes(), np.uint8).reshape(SIZE, SIZE, 3)
        expected = letterbox(read_image(photo), SIZE)[0]
        assert np.array_equal(canvas, expected), f"{photo.name}: {int((canvas != expected).sum())} bytes differ"


def test_cpp_detections_match_detector(runner, package, weights, torch_detector, photos):
    """At SCORE (one NMS over class-offset boxes) and at the sidecar's defaults (score 0.001:
    over 1000 candidates, torchvision's per-class NMS, and the 300 cut)."""
    from rtmdet.inference import Detector

    default = Detector.from_checkpoint(weights, fast=False)
    for photo in photos:
        for flags, ref in ((("--score-thr", str(SCORE)), torch_detector(photo)), ((), default(photo))):
            out = _cpp_detections(runner, package, photo, *flags)
            found = out["detections"]
            assert (out["width"], out["height"]) == ref.image_hw[::-1]
            assert len(found) >= 3, f"{photo.name}: the test model should make several detections"
            assert [d["class"] for d in found] == [CLASSES[d["label"]] for d in found]
            _assert_same([d["box"] for d in found], [d["score"] for d in found], [d["label"] for d in found], ref)


@pytest.mark.parametrize("model, image, says", [*BAD_INPUTS, ("onnx", "good", "not an AOTInductor package")])
def test_cpp_bad_input_is_one_clear_line(runner, package, photos, tmp_path, model, image, says):
    files = _bad_files(tmp_path, package)
    model_path = package if model == "good" else files[model]
    image_path = photos[0] if image == "good" else files[image]
    proc = _run_cpp(runner, model_path, image_path)
    assert proc.returncode != 0 and _one_line(proc.stderr, says), proc.stderr
    assert proc.stdout == ""


def test_cpp_rejects_another_formats_sidecar_and_bad_flags(runner, package, photos, tmp_path):
    text = package.with_suffix(".json").read_text()
    sidecars = {}
    for name, old, new in (("onnx", '"format": "aoti"', '"format": "onnx"'), ("tpu", '"device": "cpu"', '"device": "tpu"'),
                           ("cuda", '"device": "cpu"', '"device": "cuda"')):
        sidecars[name] = tmp_path / f"{name}.json"
        sidecars[name].write_text(text.replace(old, new))
    cases = [(("--sidecar", str(sidecars["onnx"])), "the sidecar of a onnx export"),
             (("--sidecar", str(sidecars["tpu"])), "a package compiled for tpu; rtmdet_run runs cpu and cuda packages"),
             (("--score-thr", "high"), "expected a non-negative number"),
             (("--repeat", "2.5"), "expected a non-negative integer"),
             (("--frobnicate",), "unknown option")]
    if not torch.cuda.is_available():
        cases.append((("--sidecar", str(sidecars["cuda"])), "a package compiled for cuda, and libtorch here sees no CUDA GPU"))
    for flags, says in cases:
        proc = _run_cpp(runner, package, photos[0], *flags)
        assert proc.returncode != 0 and _one_line(proc.stderr, re.escape(says)), (flags, proc.stderr)


def test_cpp_time_repeat_reports_the_median_of_the_calls_after_the_first(runner, package, photos):
    proc = _run_cpp(runner, package, photos[0], "--time", "--repeat", "3")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"time: load [\d.]+ ms, letterbox [\d.]+ ms, model [\d.]+ ms, postprocess [\d.]+ ms; "
                        r"model again: median [\d.]+ ms of 3\n", proc.stderr), proc.stderr


def test_canvas_check_runs_the_runners_code_as_python_does(package, photos):
    """benchmarks/aoti_cpp_check.py (how the runner's CUDA path was checked on a GPU machine without
    OpenCV) builds cpp/src's model and post-process with its stand-in cv::Mat and agrees with
    Detector on the same canvas; a compiler that is not there is a row, not a traceback."""
    if shutil.which("g++") is None:
        _unavailable("g++ not found")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "aoti_cpp_check.py"), "--package", str(package),
                           "--photo", str(photos[0]), "--score-thr", str(SCORE), "--repeat", "2",
                           "--cxx", "g++", "no-such-c++"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built, missing = (json.loads(line) for line in proc.stdout.splitlines())
    assert built["n_cpp"] == built["n_python"] >= 3 and built["labels_equal"], built
    assert built["max_box_px"] <= BOX_TOL and built["max_score"] <= SCORE_TOL, built
    assert missing == {"cxx": "no-such-c++", "build_failed": "no-such-c++: compiler not found"}


@pytest.mark.gpu
def test_cpp_runs_a_cuda_package_as_python_does(runner, weights, photos, workdir):
    """A package compiled for cuda: rtmdet_run's detections are Detector's over the same package
    (the same GPU kernels on both sides: cuDNN's TF32 convolutions make either differ from the
    float32 CPU model by more than this test's tolerances)."""
    from rtmdet.export.command import export_checkpoint
    from rtmdet.inference import Detector

    (path,) = export_checkpoint(weights, "aoti", out=workdir / "aoti-cuda", device="cuda")
    assert json.loads(path.with_suffix(".json").read_text())["device"] == "cuda"
    python = Detector.from_export(path, score_thr=SCORE)
    for photo in photos:
        found = _cpp_detections(runner, path, photo, "--score-thr", str(SCORE))["detections"]
        assert len(found) >= 3, f"{photo.name}: the test model should make several detections"
        _assert_same([d["box"] for d in found], [d["score"] for d in found], [d["label"] for d in found], python(photo))
