"""A throw-away DVC project: the pipeline's files copied into a temporary git repo, tiny params."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COPY = ("dvc.yaml", "params.yaml", "stages", "rtmdet", ".dvc/config", ".dvc/plots", ".dvcignore", ".gitignore",
        "data/.gitignore", "reports/.gitignore", "models/.gitignore")
# Seconds on 2 cores, not minutes: 24 + 8 synthetic images at 64 px, two epochs, short QAT.
TINY = {"data": {"synthetic_train": 24, "synthetic_valid": 8},
        "model": {"imgsz": 64},
        "train": {"epochs": 2, "batch_size": 8, "workers": 0, "val_interval": 1, "warmup_iters": 2},
        "qat": {"epochs": 2, "workers": 0},
        "verify": {"latency_images": 4}}
METRICS = ("reports/metrics/evaluate.json", "reports/metrics/verify.json", "reports/metrics/qat.json",
           "reports/train/metrics.json")
ARTIFACTS = ("models/best.pt", "models/export", "models/qat")
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def dvc() -> str:
    """The dvc of this Python's environment (the tests' own venv)."""
    return str(Path(sys.executable).parent / "dvc")


def available() -> bool:
    return shutil.which("git") is not None and Path(dvc()).exists()


def env(**extra: str) -> dict[str, str]:
    """The environment for DVC and its stages: this venv's `python` first, no analytics."""
    out = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", **extra}
    out["PATH"] = str(Path(sys.executable).parent) + os.pathsep + out.get("PATH", "")
    return out


def run(cmd: list[str], cwd: Path, timeout: float = 900, **extra_env: str) -> str:
    """Run a command that must succeed; its output (stdout + stderr)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def make_project(root: Path, overrides: dict | None = None) -> Path:
    """Copy the pipeline into root, apply TINY (and overrides) to params.yaml, commit it."""
    for name in COPY:
        src, dst = REPO / name, root / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in {**TINY, **(overrides or {})}.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    commit(root, "init")
    return root


def commit(root: Path, message: str) -> None:
    run([*GIT, "add", "-A"], root)
    run([*GIT, "commit", "-qm", message], root)


def read_metrics(root: Path) -> dict[str, dict]:
    """The pipeline's metrics files, without the fields that are wall times."""
    out = {}
    for rel in METRICS:
        data = json.loads((root / rel).read_text())
        for row in data.get("formats", {}).values():
            row.pop("latency_ms", None)
        data.pop("seconds", None)
        for split in ("valid", "test"):
            if isinstance(data.get(split), dict):
                data[split].pop("images_per_s", None)
        out[rel] = data
    return out


def artifact_hashes(root: Path) -> dict[str, str]:
    """sha256 of each model file the pipeline writes (checkpoints, exports and their sidecars)."""
    files = [f for rel in ARTIFACTS for f in ([root / rel] if (root / rel).is_file() else sorted((root / rel).rglob("*")))
             if f.is_file()]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
