"""The DVC pipeline end to end in a temporary git repo, with tiny params, on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COPY = ("dvc.yaml", "params.yaml", "stages", "rtmdet", ".dvc/config", ".dvc/plots", ".dvcignore", ".gitignore",
        "data/.gitignore", "reports/.gitignore", "models/.gitignore")
TINY = {"data": {"synthetic_train": 24, "synthetic_valid": 8},
        "model": {"imgsz": 64},
        "train": {"epochs": 2, "batch_size": 8, "workers": 0, "val_interval": 1, "warmup_iters": 2}}


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # `python` in dvc.yaml is this venv's
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (Path(sys.executable).parent / "dvc").exists():
        pytest.skip("git and dvc are needed for the pipeline test")
    root = tmp_path_factory.mktemp("pipeline")
    for name in COPY:
        src, dst = REPO / name, root / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    _run([str(Path(sys.executable).parent / "dvc"), "repro"], root)
    return root


def test_repro_writes_sane_outputs(repo):
    metrics = json.loads((repo / "reports/metrics/evaluate.json").read_text())["valid"]
    assert 0.0 <= metrics["mAP"] <= metrics["mAP50"] <= 1.0
    assert metrics["num_images"] == 8
    train_metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    assert train_metrics["step"] == 1 and train_metrics["train"]["loss"] > 0
    stats = json.loads((repo / "data/prepared/stats.json").read_text())
    assert stats["splits"]["train"]["images"] == 24 and stats["classes"] == ["circle", "square", "triangle", "cross"]
    for png in ("reports/prepare/augmented.png", "reports/evaluate/pr_valid.png", "reports/evaluate/worst_valid.png"):
        assert (repo / png).stat().st_size > 1000, png
    from rtmdet.models.checkpoint import load_model

    model, ckpt = load_model(repo / "models/best.pt")
    assert model.cfg.size == "nano" and model.cfg.image_size == 64
    assert ckpt["meta"]["dataset_meta"]["classes"] == stats["classes"]


def test_second_repro_runs_nothing_and_status_is_clean(repo):
    dvc = str(Path(sys.executable).parent / "dvc")
    assert "up to date" in _run([dvc, "status"], repo)
    out = _run([dvc, "repro"], repo)
    assert "Running stage" not in out


def test_evaluate_param_reruns_only_evaluate(repo):
    dvc = str(Path(sys.executable).parent / "dvc")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["conf_thr"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([dvc, "status"], repo)
    assert "evaluate:" in status and "train:" not in status and "prepare:" not in status
