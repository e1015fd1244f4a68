"""Preempted anywhere: `dvc repro` is SIGKILLed (DVC and its stage, the whole process group) at
points inside train, export, qat and verify, two of them in the middle of writing a file, and
started again each time. It must finish with a clean `dvc status`, the metrics of an
uninterrupted run, and every output complete."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import cv2
import pytest

from pipeline import project

# (kill point, what the next `dvc repro` must show it resumed from). The tiny train runs two
# epochs of three iterations; last.pt is written at the end of each epoch.
KILLS = [
    ("train:epoch#1", r"resuming runs/train/last\.pt at epoch 2, batch 0"),
    # The resumed run's first write of last.pt (epoch 2) is cut in half: epoch 2 is done again.
    ("write:last.pt#1", r"removed 1 half-written files(.|\n)*resuming runs/train/last\.pt at epoch 2, batch 0"),
    ("train:step#2", r"resuming runs/train/last\.pt at epoch 2, batch 0"),
    # Half of the int8 file in a temporary name: export starts over (train, evaluate are cached).
    ("write:best_int8.tflite", r"Running stage 'export'"),
    ("qat:step#2", r"Running stage 'qat'"),  # QAT starts over (it runs minutes, not hours)
    ("verify:format#3", r"Running stage 'verify'"),
]


def _repro(root: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    extra = {"RTMDET_KILL_AT": kill_at} if kill_at else {}
    # A session of its own: the kill point ends DVC and the stage, not pytest.
    return subprocess.run([project.dvc(), "repro"], cwd=root, env=project.env(**extra), capture_output=True,
                          text=True, timeout=900, start_new_session=True)


def _stages_run(log: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", log)


def _check_complete(root: Path) -> None:
    """No temporary file anywhere in the outputs, and every artifact loads."""
    from rtmdet.export import detector_from_export
    from rtmdet.models.checkpoint import load_model, read_checkpoint
    from rtmdet.quantization.export import load_qat

    outputs = [root / d for d in ("data", "models", "reports", "runs")]
    leftovers = [p for d in outputs for p in d.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert not leftovers, leftovers
    load_model(root / "models/best.pt")
    assert read_checkpoint(root / "runs/train/last.pt")["train_state"]["finished"]
    load_qat(root / "models/qat/qat.pt")
    models = sorted((root / "models").rglob("*.onnx")) + sorted((root / "models").rglob("*.tflite"))
    assert len(models) == 5, models  # onnx, tflite fp32/fp16/int8, qat int8
    for path in models:
        detector_from_export(path)
    for path in [*(root / "reports").rglob("*.json"), *(root / "data").rglob("*.json")]:
        json.loads(path.read_text())
    for path in (root / "reports").rglob("*.png"):
        assert cv2.imread(str(path)) is not None, path


@pytest.mark.slow
def test_repro_killed_anywhere_finishes_like_an_uninterrupted_run(reference, tmp_path):
    root = project.make_project(tmp_path / "killed")
    logs = []
    for kill_at, _ in KILLS:
        proc = _repro(root, kill_at)
        logs.append(proc.stdout + proc.stderr)
        assert proc.returncode == -signal.SIGKILL, f"{kill_at} was never reached:\n{logs[-1][-3000:]}"
    final = _repro(root, None)
    logs.append(final.stdout + final.stderr)
    assert final.returncode == 0, logs[-1][-3000:]
    for (kill_at, resumed), log in zip(KILLS, logs[1:]):
        assert re.search(resumed, log), f"after a kill at {kill_at}, expected /{resumed}/ in:\n{log[-3000:]}"
    # What each run redid: train resumed twice from last.pt; the stages after it were cached.
    assert "train" not in _stages_run(logs[4]) and "evaluate" not in _stages_run(logs[4])
    assert "export" not in _stages_run(logs[5]) and _stages_run(logs[-1])[:1] == ["verify"]
    assert "up to date" in project.run([project.dvc(), "status"], root)
    # Every stage is deterministic on one machine: the same numbers as the uninterrupted run
    # (CPU wall times left out) and the same bytes in every model file. Train resumes exactly
    # (see tests/test_trainer.py).
    assert project.read_metrics(root) == reference.metrics
    assert project.artifact_hashes(root) == reference.artifacts
    _check_complete(root)
