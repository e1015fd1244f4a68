"""The report stage: reports/README.md (this run) and reports/experiments.md (every run).

Layout under the reports folder:
  README.md            metrics, exported models, QAT, training curves, per-class tables, the
                       evaluate and prepare PNGs, the params of the run
  experiments.md       the params that differ between HEAD, the DVC experiments and this run,
                       with their metrics, ranked by report.metric
  report/training.png, report/experiments.png   the figures drawn here
The PNGs are written before the pages and every file atomically, so a page on disk is complete
and DVC never caches half of one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rtmdet.config import load_params
from rtmdet.errors import ConfigError
from rtmdet.fileio import write_atomic
from rtmdet.reporting.compare import CHART, experiments_page
from rtmdet.reporting.experiments import collect_runs, dvc_context
from rtmdet.reporting.inputs import EVALUATE, read_evaluate
from rtmdet.reporting.page import TRAINING_PNG, readme_page

log = logging.getLogger(__name__)

README, EXPERIMENTS = Path("README.md"), Path("experiments.md")


SECTIONS = ("report", "data", "model", "train")  # the params the stage reads


def write_reports(reports: str | Path = "reports", params_file: str | Path = "params.yaml",
                  params: dict[str, Any] | None = None, project: Path | None = None) -> list[Path]:  # fmt: skip
    """Write both pages (and their PNGs) under `reports`; returns the files written. `params`:
    load_params(params_file, SECTIONS), loaded when not given. Experiments come from the git
    repository DVC runs in (or `project`, default the current folder)."""
    reports, params_file = Path(reports), Path(params_file)
    params = dict(params or load_params(params_file, sections=SECTIONS))
    metric = params.pop("report").metric
    evaluate = read_evaluate(reports)
    if metric == "auto":  # the task's own number: a classifier's evaluate.json has top1, a detector's mAP
        metric = "top1" if any("top1" in v for v in evaluate.values()) else "mAP"
    if not any(metric in v for v in evaluate.values()):
        have = ", ".join(k for k in next(iter(evaluate.values())) if "/" not in k)
        raise ConfigError(f"params: report.metric '{metric}' is not in {reports / EVALUATE} (it has: {have})")
    exp_repo, run_name = dvc_context()
    readme, files = readme_page(reports, evaluate, params, run_name)
    runs, notes = collect_runs(params_file, reports, project=project, exp_repo=exp_repo, run_name=run_name)
    experiments, exp_files = experiments_page(runs, metric, notes)
    files.update(exp_files)
    written = []
    for rel in (TRAINING_PNG, CHART):  # a figure not drawn this time must not linger from an older run
        if rel.as_posix() not in files:
            (reports / rel).unlink(missing_ok=True)
    for rel, data in [*files.items(), (README.as_posix(), readme), (EXPERIMENTS.as_posix(), experiments)]:
        write_atomic(reports / rel, data)
        written.append(reports / rel)
    log.info("wrote %s and %s", reports / README, reports / EXPERIMENTS)
    return written
