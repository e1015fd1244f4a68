"""The DVC pipeline end to end in a temporary git repo, with tiny params, on the CPU."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline import project
from pipeline.project import dvc, run

@pytest.fixture(scope="module")
def repo(reference) -> Path:
    return reference.root


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
    assert "up to date" in run([dvc(), "status"], repo)
    out = run([dvc(), "repro"], repo)
    assert "Running stage" not in out


def test_evaluate_param_reruns_only_evaluate(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["conf_thr"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run([dvc(), "status"], repo)
    assert "evaluate:" in status and "train:" not in status and "prepare:" not in status


def test_export_param_reruns_export_verify_report_and_not_train(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["export"]["formats"] = ["onnx", "tflite_fp32", "tflite_int8"]  # no fp16 file this time
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run([dvc(), "status"], repo)
    assert "export:" in status and "train:" not in status and "qat:" not in status
    out = run([dvc(), "repro"], repo)
    ran = re.findall(r"Running stage '(\w+)'", out)
    # (evaluate runs too: the test before changed one of its params without a repro)
    assert set(ran) >= {"export", "verify", "report"} and not set(ran) & {"train", "prepare", "qat"}, ran
    assert "tflite_fp16" not in json.loads((repo / "reports/metrics/verify.json").read_text())["formats"]
    assert not list((repo / "models/export").glob("*fp16*"))


def _fingerprints(root: Path) -> dict[str, str]:
    """sha256 of every file under the workspace's pipeline outputs, and of params.yaml."""
    files = [root / "params.yaml"] + [f for d in ("models", "reports", "data/prepared", "runs")
                                      for f in sorted((root / d).rglob("*")) if f.is_file()]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _experiments(root: Path) -> dict[str, dict]:
    """name -> {params, metrics} of every finished experiment, from `dvc exp show --json`."""
    out = {}
    for baseline in json.loads(run([dvc(), "exp", "show", "--json"], root)):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            if rev.get("data"):
                data = rev["data"]
                out[exp["name"]] = {"params": data["params"]["params.yaml"]["data"],
                                    "metrics": {k: v["data"] for k, v in data["metrics"].items()}}
    return out


def test_queued_experiments_run_two_at_a_time_and_leave_the_workspace_alone(repo):
    # DVC runs queued experiments in temporary clones of the last commit (.dvc/tmp/exps), so the
    # code, params.yaml and dvc.lock must be committed; outputs come from the DVC cache, and
    # persisted outputs (runs/train, the dvclive folder) start empty there: a queued train
    # cannot pick up the workspace's last.pt. Image folders outside the project are recorded
    # absolute in data/prepared for the same reason (relative ones would point elsewhere).
    project.commit(repo, "params")
    before = _fingerprints(repo)
    variants = {"epochs3": "train.epochs=3", "conf04": "evaluate.conf_thr=0.4", "conf06": "evaluate.conf_thr=0.6"}
    for name, setting in variants.items():
        run([dvc(), "exp", "run", "--queue", "-n", name, "-S", setting], repo)
    # The workers outlive `dvc queue start`: their output goes to a file, so nothing waits for
    # the pipes they would hold open.
    with (repo.parent / "queue-start.log").open("w") as log:
        subprocess.run([dvc(), "queue", "start", "-j", "2"], cwd=repo, env=project.env(), stdout=log,
                       stderr=subprocess.STDOUT, timeout=120, check=True)
    deadline = time.monotonic() + 1200
    while (status := run([dvc(), "queue", "status"], repo)).count("Success") < len(variants):
        assert "Failed" not in status, run([dvc(), "queue", "logs", *variants], repo)
        assert time.monotonic() < deadline, status
        time.sleep(5)
    run([dvc(), "queue", "stop"], repo)  # no worker left behind
    exps = _experiments(repo)
    assert set(exps) >= set(variants), (exps.keys(), status)
    evaluate = {name: exps[name]["metrics"]["reports/metrics/evaluate.json"]["valid"] for name in variants}
    assert exps["epochs3"]["params"]["train"]["epochs"] == 3
    assert exps["conf04"]["params"]["evaluate"]["conf_thr"] == 0.4
    # The two evaluate-only experiments reuse the baseline's model: the same mAP, their own threshold.
    base = json.loads((repo / "reports/metrics/evaluate.json").read_text())["valid"]
    assert evaluate["conf04"]["mAP"] == evaluate["conf06"]["mAP"] == base["mAP"]
    assert all("verify.json" in " ".join(exps[n]["metrics"]) for n in variants)
    assert _fingerprints(repo) == before  # nothing in the workspace moved
    run(["rtmdet", "report"], repo)
    page = (repo / "reports/experiments.md").read_text()
    assert all(f"| {name} " in page for name in variants), page
    diff = run([dvc(), "exp", "diff", "epochs3"], repo)  # baseline against an experiment
    assert "reports/metrics/evaluate.json" in diff and "train.epochs" in diff, diff
