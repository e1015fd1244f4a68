"""The report stage: README.md from fixture reports, the experiment comparison, and a real
git + DVC repository with two experiments where the report runs as a stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rtmdet.errors import ConfigError, DataError
from rtmdet.reporting.compare import comparison_frame, dedupe, differing_params, experiments_page
from rtmdet.reporting.experiments import Run, collect_runs, flatten
from rtmdet.reporting.stage import write_reports

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square")
STATS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
         "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")  # fmt: skip
PARAMS = {"data": {"root": "data/synthetic"}, "model": {"size": "nano", "imgsz": 192},
          "train": {"epochs": 3, "lr": 0.008}, "report": {"metric": "mAP"}}  # fmt: skip
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")  # fmt: skip


def split_metrics(map_: float) -> dict:
    stats = {name: round(map_ + 0.01 * i, 4) for i, name in enumerate(STATS)}
    stats["mAP_large"] = None  # COCO's -1: no large boxes
    return {**stats, **{f"AP/{c}": map_ for c in CLASSES}, **{f"AP50/{c}": map_ + 0.1 for c in CLASSES},
            "images_per_s": 50.0, "num_images": 8, "precision_at_conf": 0.7, "recall_at_conf": 0.6,
            "f1_at_conf": 0.65}  # fmt: skip


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_reports(root: Path, optional: bool = True, map_: float = 0.5) -> Path:
    """params.yaml and a reports folder as the pipeline leaves them; `optional` adds every
    optional input (per-class tables, PNGs, dvclive curves, prepare charts, verify, qat)."""
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    reports = root / "reports"
    write_json(reports / "metrics/evaluate.json", {"valid": split_metrics(map_), "test": split_metrics(map_ - 0.1)})
    if not optional:
        return reports
    for split in ("valid", "test"):
        write_json(reports / f"evaluate/per_class_{split}.json",
                   [{"class": c, "category_id": i + 1, "num_gt": 10, "absent": False, "AP": 0.4, "AP50": 0.7,
                     "tp": 7, "fp": 2, "fn": 3, "precision": 0.78, "recall": 0.7} for i, c in enumerate(CLASSES)])
        for key in ("pr", "confusion", "per_class_ap", "worst"):
            (reports / f"evaluate/{key}_{split}.png").write_bytes(PNG)
    from rtmdet.training.logs import LiveLogger  # the trainer's own writer: the real file layout

    live = LiveLogger(reports / "train", resume=False)
    for epoch in range(6):
        metrics = {"train/loss": 2.0 / (epoch + 1), "train/loss_cls": 1.0 / (epoch + 1),
                   "train/loss_bbox": 1.0 / (epoch + 1), "train/lr": 0.001 * min(epoch + 1, 3)}  # fmt: skip
        if epoch % 2 == 1:
            metrics.update({"val/mAP": 0.1 * epoch, "val/mAP50": 0.15 * epoch})
        live.log_epoch(epoch, metrics)
    live.close()
    (reports / "prepare").mkdir(parents=True)
    (reports / "prepare/box_sizes.png").write_bytes(PNG)
    write_json(reports / "prepare/stats.json", {"classes": list(CLASSES), "splits": {
        "train": {"images": 24, "boxes": 60, "images_without_boxes": 1}}})
    formats = {name: {"mAP": map_ - d, "mAP50": map_ + 0.2 - d, "drop": d, "size_mb": 4.2, "latency_ms": 12.5}
               for name, d in (("torch", 0.0), ("onnx", 0.0), ("tflite_fp32", 0.001), ("tflite_int8", 0.03))}
    formats["tflite_int8"]["operators"] = {"CONV_2D": 78, "DEPTHWISE_CONV_2D": 10, "QUANTIZE": 1}
    write_json(reports / "metrics/verify.json", {"split": "valid", "formats": formats})
    write_json(reports / "metrics/qat.json", {"fake_quant": {"mAP": 0.48, "mAP50": 0.69},
                                              "float": {"mAP": 0.5, "mAP50": 0.7}})  # fmt: skip
    write_json(reports / "train/teacher.json", {"teacher": "tiny", "student_mAP": 0.51, "student_train_seconds": 30.0,
                                                "teacher_mAP": 0.62, "teacher_epochs": 6, "teacher_train_seconds": 61.0})
    return reports


@pytest.fixture(autouse=True)
def _outside_dvc(monkeypatch):
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)


def test_readme_with_every_input(tmp_path):
    reports = make_reports(tmp_path)
    write_reports(reports, tmp_path / "params.yaml", project=tmp_path)
    page = (reports / "README.md").read_text()
    for stat in STATS:
        assert f"| `{stat}` |" in page
    assert "| `mAP` | AP, IoU 0.50:0.95 | 0.5000 | 0.4000 |" in page
    assert "| `mAP_large` | AP, large boxes (> 96² px) | – | – |" in page
    assert "| circle | 10 | 0.4000 | 0.7000 | 7 | 2 | 3 | 0.7800 | 0.7000 |" in page
    assert "| `tflite_int8` | 0.4700 | 0.6700 | 0.0300 | 4.20 | 12.5 |" in page
    assert page.index("`torch`") < page.index("`onnx`") < page.index("`tflite_fp32`") < page.index("`tflite_int8`")
    assert "| after QAT, simulated int8 (fake-quant) | 0.4800 | 0.6900 |" in page
    assert ("Operators of `tflite_int8` (what a runtime must implement): CONV_2D x78, DEPTHWISE_CONV_2D x10, "
            "QUANTIZE x1.") in page
    assert "| teacher | `tiny` | 0.6200 | 6 | 61 |" in page  # distillation side by side
    assert "| student (distilled) | `models/best.pt` | 0.5100 |  | 30 |" in page
    for link in ("report/training.png", "evaluate/pr_valid.png", "evaluate/worst_test.png",
                 "prepare/box_sizes.png"):  # fmt: skip
        assert f"]({link})" in page and (reports / link).is_file(), link
    assert "* **model**: size=nano, imgsz=192, task=detect, act=null" in page
    assert "| train | 24 | 60 | 1 |" in page
    assert (reports / "report/training.png").stat().st_size > 10_000
    assert "_No " not in page  # no section left out


def test_readme_without_optional_inputs(tmp_path):
    reports = make_reports(tmp_path, optional=False)
    write_reports(reports, tmp_path / "params.yaml", project=tmp_path)
    page = (reports / "README.md").read_text()
    assert "| `AR_large` |" in page
    for note in ("_No exported-model scores:", "_No quantization-aware training scores:",
                 "_No training curves:", "_No per-class table for valid:", "_No dataset charts:",
                 "_No precision-recall curves:"):  # fmt: skip
        assert note in page, note
    assert "| circle | 0.5000 | 0.6000 |" in page  # AP per class from evaluate.json instead
    assert "## Distillation" not in page  # no teacher: no section
    assert not (reports / "report/training.png").exists()
    assert "1 run: the workspace run." in (reports / "experiments.md").read_text()


def test_broken_optional_input_is_a_note_and_missing_evaluate_an_error(tmp_path, capsys):
    reports = make_reports(tmp_path, optional=False)
    (reports / "metrics/verify.json").write_text("{not json")
    write_reports(reports, tmp_path / "params.yaml", project=tmp_path)
    assert "not valid JSON" in (reports / "README.md").read_text()
    (reports / "metrics/evaluate.json").unlink()
    with pytest.raises(DataError, match="evaluate.json: not found"):
        write_reports(reports, tmp_path / "params.yaml", project=tmp_path)
    from rtmdet.cli import main

    assert main(["report", "--reports", str(reports), "--params", str(tmp_path / "params.yaml")]) == 2
    expected = f"error: {reports / 'metrics/evaluate.json'}: not found; run the evaluate stage first"
    assert capsys.readouterr().err.strip() == expected


def test_unknown_metric_is_a_config_error(tmp_path):
    reports = make_reports(tmp_path, optional=False)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["report"]["metric"] = "mAP_tiny"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="report.metric 'mAP_tiny' is not in"):
        write_reports(reports, tmp_path / "params.yaml", project=tmp_path)


def _run(name: str, kind: str, params: dict, map_: float | None, verify: float | None = None) -> Run:
    evaluate = None if map_ is None else {"valid": {"mAP": map_, "mAP50": map_ + 0.2}}
    formats = None if verify is None else {"formats": {"torch": {"mAP": map_}, "tflite_int8": {"mAP": verify}}}
    return Run(name, "workspace" if kind == "workspace" else name[:7], kind, flatten(params), evaluate, formats)


def test_differing_params_and_ranking():
    base = {"model": {"size": "nano", "imgsz": 192}, "train": {"epochs": 60, "lr": 0.008, "splits": None}}
    runs = [_run("main", "baseline", base, 0.5),
            _run("exp-a", "experiment", {**base, "train": {**base["train"], "epochs": 100}}, 0.6, verify=0.55),
            _run("exp-b", "experiment", {**base, "model": {"size": "tiny", "imgsz": 192}, "train": base["train"],
                                         "qat": {"epochs": 5}}, 0.7),
            _run("exp-c", "experiment", base, None)]  # fmt: skip
    assert differing_params(runs) == ["model.size", "train.epochs", "qat.epochs"]
    frame, rank = comparison_frame(runs, "mAP")
    assert rank == "valid mAP"
    assert list(frame["experiment"]) == ["exp-b", "exp-a", "main", "exp-c"]  # best first, no metrics last
    assert list(frame.columns) == ["experiment", "commit", "model.size", "train.epochs", "qat.epochs",
                                   "valid mAP", "valid mAP50", "tflite_int8 mAP"]  # fmt: skip
    assert list(frame["qat.epochs"]) == ["5", "–", "–", "–"]  # absent from the others
    assert differing_params(runs[:1]) == [] and differing_params([runs[0], runs[3]]) == []


def test_workspace_equal_to_a_commit_is_one_row():
    params = {"train": {"epochs": 60}}
    runs = [_run("main", "baseline", params, 0.5), _run("exp-a", "experiment", {"train": {"epochs": 9}}, 0.3),
            _run("workspace", "workspace", params, 0.5)]  # fmt: skip
    kept = dedupe(runs, "mAP")
    assert [r.name for r in kept] == ["main", "exp-a"] and kept[0].current
    text, files = experiments_page(runs, "mAP")
    assert "| main (this run) |" in text and "2 runs" in text and "report/experiments.png" in files
    changed = [*runs[:2], _run("workspace", "workspace", params, 0.45)]  # same params, new numbers
    assert [r.name for r in dedupe(changed, "mAP")] == ["main", "exp-a", "workspace"]


def test_not_a_git_repository_lists_the_workspace(tmp_path):
    reports = make_reports(tmp_path, optional=False)
    runs, notes = collect_runs(tmp_path / "params.yaml", reports, project=tmp_path)
    assert [r.kind for r in runs] == ["workspace"] and runs[0].params["train.epochs"] == 3
    assert notes and notes[0].startswith("Only the current run")


# A real repository: a stage whose metrics depend on train.epochs, then the report stage.
DVC_YAML = """
stages:
  score:
    cmd: python score.py
    deps: [score.py]
    params: [train.epochs]
    metrics:
      - reports/metrics/evaluate.json:
          cache: false
  report:
    cmd: python stages/report.py
    deps: [stages/report.py, reports/metrics/evaluate.json]
    params: [report, data, model, train]
    outs:
      - reports/README.md:
          cache: false
      - reports/experiments.md:
          cache: false
          persist: true
      - reports/report:
          cache: false
"""
SCORE = """import json, pathlib, yaml
epochs = yaml.safe_load(open("params.yaml"))["train"]["epochs"]
pathlib.Path("reports/metrics").mkdir(parents=True, exist_ok=True)
json.dump({"valid": {"mAP": epochs / 100, "mAP50": epochs / 50}}, open("reports/metrics/evaluate.json", "w"))
"""


def _sh(cmd: list[str], cwd: Path) -> str:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),  # `python` in dvc.yaml is this one
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _table(page: str) -> dict[str, dict[str, str]]:
    """The experiments table as {experiment: {column: cell}}."""
    lines = [ln for ln in page.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]
    return {r["experiment"]: r for r in rows}


def test_experiments_in_a_dvc_repository(tmp_path):
    dvc = Path(sys.executable).parent / "dvc"
    if shutil.which("git") is None or not dvc.exists():
        pytest.skip("git and dvc are needed")
    (tmp_path / "stages").mkdir()
    shutil.copy2(REPO / "stages/report.py", tmp_path / "stages/report.py")
    (tmp_path / "score.py").write_text(SCORE)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    _sh(["git", "init", "-q", "-b", "main"], tmp_path)
    _sh([str(dvc), "init", "-q"], tmp_path)
    _sh([str(dvc), "config", "core.analytics", "false"], tmp_path)
    _sh([str(dvc), "repro", "-q"], tmp_path)
    _sh(["git", "add", "-A"], tmp_path)
    _sh(["git", "commit", "-qm", "baseline"], tmp_path)
    _sh([str(dvc), "exp", "run", "-q", "-n", "long", "-S", "train.epochs=20"], tmp_path)
    # The second one runs in a standalone temporary clone: only $DVC_ROOT has the first's ref.
    _sh([str(dvc), "exp", "run", "-q", "--temp", "-n", "lr", "-S", "train.epochs=7", "-S", "train.lr=0.01"],
        tmp_path)
    refs = dict(line.split()[::-1] for line in _sh(["git", "for-each-ref", "--format=%(objectname) %(refname)",
                                                    "refs/exps"], tmp_path).splitlines())  # fmt: skip
    long_ref = next(ref for ref in refs if ref.endswith("/long"))
    rows = _table(_sh(["git", "show", f"{long_ref}:reports/experiments.md"], tmp_path))  # written inside `long`
    assert set(rows) == {"main", "long (this run)"} and rows["long (this run)"]["commit"] == "workspace"
    assert rows["long (this run)"]["train.epochs"] == "20" and rows["long (this run)"]["valid mAP"] == "0.2000"
    _sh([str(dvc), "exp", "apply", "lr"], tmp_path)
    page = (tmp_path / "reports/experiments.md").read_text()
    rows = _table(page)
    assert set(rows) == {"main", "long", "lr (this run)"}, page
    assert [r["experiment"] for r in rows.values()] == ["long", "lr (this run)", "main"]  # ranked by mAP
    assert rows["long"]["train.epochs"] == "20" and rows["long"]["valid mAP"] == "0.2000"
    assert rows["lr (this run)"]["train.epochs"] == "7" and rows["lr (this run)"]["train.lr"] == "0.01"
    assert rows["lr (this run)"]["valid mAP"] == "0.0700" and rows["main"]["valid mAP50"] == "0.0600"
    assert rows["main"]["train.lr"] == "0.008"
    assert "experiment `lr`" in (tmp_path / "reports/README.md").read_text()
    assert (tmp_path / "reports/report/experiments.png").stat().st_size > 5_000
    # Outside DVC, in the workspace that `exp apply` restored: the same runs, the workspace is `lr`.
    _sh([sys.executable, "-m", "rtmdet", "report"], tmp_path)
    rows = _table((tmp_path / "reports/experiments.md").read_text())
    assert set(rows) == {"main", "long", "lr (this run)"}


def test_a_classifiers_report_shows_top1_and_ranks_by_it(tmp_path):
    params = {**PARAMS, "model": {"size": "tiny", "imgsz": 224, "task": "classify"}, "report": {"metric": "auto"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    reports = tmp_path / "reports"
    write_json(reports / "metrics/evaluate.json", {"valid": {"top1": 0.91, "top5": 0.99, "precision": 0.9,
                                                            "recall": 0.88, "f1": 0.89, "num_images": 328}})
    formats = {name: {"top1": 0.91 - d, "top5": 0.99, "drop": d, "size_mb": 2.0, "latency_ms": 3.0}
               for name, d in (("torch", 0.0), ("onnx", 0.0), ("tflite_int8", 0.004), ("qat_int8", 0.002))}
    write_json(reports / "metrics/verify.json", {"split": "val", "task": "classify", "formats": formats})
    write_json(reports / "metrics/qat.json", {"float": {"top1": 0.91}, "fake_quant": {"top1": 0.905},
                                              "int8": {"top1": 0.908}, "epochs": 2})
    write_reports(reports, tmp_path / "params.yaml", project=tmp_path)
    page = (reports / "README.md").read_text()
    assert page.startswith("# Run report: CSPNeXt classifier-tiny at 224 px")
    assert "valid top-1 0.9100, top-5 0.9900 (328 images)" in page
    assert "| `top1` | top-1 accuracy (classifier) | 0.9100 |" in page
    assert "| `tflite_int8` | 0.9060 | 0.9900 | 0.0040 | 2.00 | 3.0 |" in page
    assert "drop = torch top-1 − the format's top-1." in page
    assert "| the int8 TFLite of the QAT weights | 0.9080 |" in page
    experiments = (reports / "experiments.md").read_text()
    assert "valid top1" in experiments and "valid top5" in experiments and "qat_int8 top1" in experiments
    assert "mAP" not in experiments
