"""The `rtmdet` command: predict end to end, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import random_detector_checkpoint
from rtmdet.cli import main


@pytest.fixture()
def checkpoint(tmp_path):
    return random_detector_checkpoint(tmp_path / "w.pt", category_ids=[5, 7])


def test_predict_folder_writes_images_and_json(checkpoint, tmp_path):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "sub/b.png"):
        cv2.imwrite(str(src / name), rng.integers(0, 255, (40, 70, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(checkpoint), "--source", str(src), "--out", str(out), "--score-thr", "0.001"]) == 0
    assert (out / "a.jpg").is_file() and (out / "sub" / "b.jpg").is_file()
    results = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in results} == {"a.jpg", "sub/b.png"}
    assert all(len(r["bbox"]) == 4 and r["category_name"] in ("cat", "dog") for r in results)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--weights", "{tmp}/none.pt", "--source", "{tmp}"], "none.pt: checkpoint file not found"),
        (["--weights", "{ckpt}", "--source", "{tmp}/nothing"], "nothing: no such image file or folder"),
        (["--weights", "{ckpt}", "--source", "{tmp}", "--imgsz", "100"], "--imgsz 100 is not a multiple of 32"),
        (["--weights", "{tmp}/m.pt2", "--source", "{tmp}", "--precision", "fp16"],
         "m.pt2: --precision and --compile apply to checkpoints; an AOTInductor package is compiled already"),
    ],
)
def test_predict_errors_are_one_line(checkpoint, tmp_path, args, expected):
    args = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in args]
    proc = subprocess.run([sys.executable, "-m", "rtmdet", "predict", *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {expected}"] or expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
