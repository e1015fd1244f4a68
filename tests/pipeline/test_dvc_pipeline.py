"""The DVC pipeline end to end in a temporary git repo, with tiny params, on the CPU."""

from __future__ import annotations

import json
import os
import re
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
    exported = sorted(f.name for f in (repo / "models/export").iterdir())
    assert exported == ["best.json", "best.onnx", "best_fp16.json", "best_fp16.tflite", "best_fp32.json",
                        "best_fp32.tflite", "best_int8.json", "best_int8.tflite"]
    verify = json.loads((repo / "reports/metrics/verify.json").read_text())
    assert list(verify["formats"]) == ["torch", "onnx", "tflite_fp32", "tflite_fp16", "tflite_int8", "qat_int8"]
    rows = verify["formats"]
    assert rows["torch"]["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)  # the same evaluator as evaluate
    assert abs(rows["onnx"]["drop"]) <= 1e-3 and abs(rows["tflite_fp32"]["drop"]) <= 2e-3
    assert rows["tflite_int8"]["size_mb"] < rows["tflite_fp32"]["size_mb"] / 3
    qat = json.loads((repo / "reports/metrics/qat.json").read_text())
    assert 0.0 <= qat["fake_quant"]["mAP"] <= 1.0
    page = (repo / "reports/README.md").read_text()
    assert "tflite_int8" in page and f"{metrics['mAP']:.4f}"[:5] in page
    for link in re.findall(r"\]\(([^)]+\.png)\)", page):
        assert (repo / "reports" / link).is_file(), link


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


def test_export_param_reruns_export_verify_report_and_not_train(repo):
    dvc = str(Path(sys.executable).parent / "dvc")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["export"]["formats"] = ["onnx", "tflite_fp32", "tflite_int8"]  # no fp16 file this time
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([dvc, "status"], repo)
    assert "export:" in status and "train:" not in status and "qat:" not in status
    out = _run([dvc, "repro"], repo)
    ran = re.findall(r"Running stage '(\w+)'", out)
    # (evaluate runs too: the test before changed one of its params without a repro)
    assert set(ran) >= {"export", "verify", "report"} and not set(ran) & {"train", "prepare", "qat"}, ran
    assert "tflite_fp16" not in json.loads((repo / "reports/metrics/verify.json").read_text())["formats"]
    assert not list((repo / "models/export").glob("*fp16*"))


def test_two_experiments_are_compared_in_experiments_md(repo):
    dvc = str(Path(sys.executable).parent / "dvc")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    _run([*git, "add", "-A"], repo)
    _run([*git, "commit", "-qm", "params"], repo)
    for name, epochs in (("short", 1), ("long", 3)):
        _run([dvc, "exp", "run", "-n", name, "-S", f"train.epochs={epochs}"], repo)
    assert set(_run([dvc, "exp", "list", "--name-only"], repo).split()) >= {"short", "long"}
    page = (repo / "reports/experiments.md").read_text()  # written inside the `long` run
    lines = [line.strip().strip("|").split("|") for line in page.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0]]
    rows = {r[0].strip(): dict(zip(header, (c.strip() for c in r))) for r in lines[2:]}
    assert rows["short"]["train.epochs"] == "1" and rows["long (this run)"]["train.epochs"] == "3", rows
    long_map = json.loads((repo / "reports/metrics/evaluate.json").read_text())["valid"]["mAP"]
    assert rows["long (this run)"]["valid mAP"] == f"{long_map:.4f}", rows
    assert (repo / "reports/report/experiments.png").stat().st_size > 1000
    diff = _run([dvc, "metrics", "diff"], repo)
    assert "reports/metrics/evaluate.json" in diff
