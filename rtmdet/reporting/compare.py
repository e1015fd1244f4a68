"""The experiments page: the params that differ between runs, their metrics, and a bar chart."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from rtmdet.reporting.experiments import WORKSPACE, Run
from rtmdet.reporting.inputs import REPORT_DIR, format_order
from rtmdet.reporting.markdown import MISSING, figure_png, image, table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CHART = REPORT_DIR / "experiments.png"
MAX_BARS = 40  # more runs than this: the chart shows the best ones (the table has them all)
_ABSENT = object()


def metric_values(run: Run, metric: str) -> dict[str, float | None]:
    """A run's compared numbers: `metric` and its companion (mAP50, or top5 for a classifier's
    top-1) per evaluated split, then each exported format's mAP or top-1 (torch is left out: it is
    the evaluate stage's own number again)."""
    out: dict[str, float | None] = {}
    for split, values in (run.evaluate or {}).items():
        if isinstance(values, dict):
            for name in dict.fromkeys((metric, companion(metric))):
                out[f"{split} {name}"] = _number(values.get(name))
    formats = (run.verify or {}).get("formats")
    key = "top1" if metric.startswith("top") else "mAP"
    if isinstance(formats, dict):
        for name in format_order([f for f in formats if f != "torch" and isinstance(formats[f], dict)]):
            out[f"{name} {key}"] = _number(formats[name].get(key))
    return out


def companion(metric: str) -> str:
    """The second number shown beside the ranking metric: top5 for a classifier's, else mAP50."""
    return "top5" if metric.startswith("top") else "mAP50"


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def dedupe(runs: Sequence[Run], metric: str) -> list[Run]:
    """Drop the workspace run when a committed one has the same params and numbers (it *is* that
    run: a clean checkout, or an experiment restored), and mark that one as current."""
    committed = [r for r in runs if r.kind != WORKSPACE]
    out = list(committed)
    for ws in (r for r in runs if r.kind == WORKSPACE):
        key = (ws.params, metric_values(ws, metric))
        same = [r for r in committed if (r.params, metric_values(r, metric)) == key]
        if not same:
            out.append(ws)
            continue
        twin = next((r for r in same if r.name == ws.name), same[0])
        twin.current = True
    return out


def differing_params(runs: Sequence[Run]) -> list[str]:
    """The "section.key" params whose value (or presence) is not the same in every run, in
    params.yaml order."""
    keys = list(dict.fromkeys(k for r in runs for k in r.params))
    return [k for k in keys if len({_key(r.params.get(k, _ABSENT)) for r in runs}) > 1]


def _key(value: Any) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value, sort_keys=True, default=str)


def _param_text(value: Any) -> str:
    if value is _ABSENT:
        return MISSING
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)


def comparison_frame(runs: Sequence[Run], metric: str) -> tuple[pd.DataFrame, str | None]:
    """One row per run, best first: name, commit, the differing params and the numbers; with the
    column the rows are ranked by (None when no run has a number for it)."""
    params = differing_params(runs)
    metrics = [metric_values(r, metric) for r in runs]
    columns = list(dict.fromkeys(c for m in metrics for c in m))
    splits = list(dict.fromkeys(s for r in runs for s in (r.evaluate or {})))
    split = "valid" if "valid" in splits else splits[0] if splits else None
    rank = f"{split} {metric}" if split and f"{split} {metric}" in columns else None
    baselines = {r.baseline for r in runs if r.baseline}
    rows = []
    for run, values in zip(runs, metrics, strict=True):
        row: dict[str, Any] = {"experiment": run.name + (" (this run)" if run.current else ""), "commit": run.rev}
        if len(baselines) > 1:  # experiments of different commits: say which
            row["baseline"] = run.baseline or MISSING
        row.update({p: _param_text(run.params.get(p, _ABSENT)) for p in params})
        row.update({c: values.get(c) for c in columns})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if rank is not None:
        frame = frame.sort_values(rank, ascending=False, na_position="last", kind="stable")
    return frame.reset_index(drop=True), rank


def comparison_figure(frame: pd.DataFrame, rank: str, metric: str) -> Figure:
    """Horizontal bars per run, best at the top: `metric` and its companion of the ranking split."""
    from matplotlib.figure import Figure

    split = rank.split(" ")[0]
    cols = list(dict.fromkeys((rank, f"{split} {companion(metric)}")))
    shown = frame.head(MAX_BARS).iloc[::-1]  # barh draws bottom-up
    n = len(shown)
    fig = Figure(figsize=(9, 1.8 + 0.5 * n * max(1, len(cols) / 2)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(cols)
    colors = ("#1f4e9c", "#8fb3e8")
    top = 0.0
    for i, col in enumerate(cols):
        values = shown[col].astype(float)
        y = [k + (len(cols) - 1 - 2 * i) * height / 2 for k in range(n)]
        bars = ax.barh(y, values.fillna(0.0), height=height, color=colors[i % 2], label=col.split(" ", 1)[1])
        missing = "no metrics" if i == 0 else ""
        ax.bar_label(bars, labels=[missing if math.isnan(v) else f"{v:.3f}" for v in values],
                     padding=3, fontsize=9)  # fmt: skip
        top = max(top, float(values.max(skipna=True)) if values.notna().any() else 0.0)
    ax.set_yticks(range(n), shown["experiment"])
    ax.set_xlim(0, max(top * 1.18, 0.05))
    ax.set_xlabel(f"{split} score (COCO bbox)")
    ax.set_ylabel("experiment")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.9 / (n + 2)), ncol=len(cols), frameon=False)
    more = f", best {MAX_BARS} of {len(frame)}" if len(frame) > MAX_BARS else ""
    ax.set_title(f"{' and '.join(c.split(' ', 1)[1] for c in cols)} per experiment on {split} (best first{more})")
    return fig


def experiments_page(runs: Sequence[Run], metric: str, notes: Sequence[str] = ()) -> tuple[str, dict[str, bytes]]:
    """The markdown of reports/experiments.md and its PNG, {path relative to reports: bytes}."""
    runs = dedupe(runs, metric)
    frame, rank = comparison_frame(runs, metric)
    n_exp = sum(r.kind == "experiment" for r in runs)
    baseline = next((r.name for r in runs if r.kind == "baseline"), None)
    parts = [f"`{baseline}` (the current commit)"] if baseline else []
    if n_exp:
        parts.append(f"{n_exp} DVC experiment{'s' if n_exp != 1 else ''}")
    if any(r.kind == WORKSPACE for r in runs):
        parts.append("the workspace run")
    lines = ["# Experiments", "",
             f"{len(runs)} run{'s' if len(runs) != 1 else ''}: {', '.join(parts)}. "
             + (f"Ranked by {rank} (best first). " if rank else "No run has metrics to rank by. ")
             + "Only the params that differ between runs are shown; the others are in `params.yaml`.", ""]  # fmt: skip
    params = differing_params(runs)
    if len(runs) > 1 and not params:
        lines += ["Every run has the same params.", ""]
    lines += [table(list(frame.columns), frame.astype(object).where(frame.notna(), None).values.tolist(),
                    align="ll" + "".join("l" if c in params or c == "baseline" else "r" for c in frame.columns[2:])),
              ""]  # fmt: skip
    files: dict[str, bytes] = {}
    if rank is not None and frame[rank].notna().any():
        files[CHART.as_posix()] = figure_png(comparison_figure(frame, rank, metric))
        lines += [image(CHART.as_posix(), f"{rank} per experiment"), ""]
    notes = [*notes, *(n for r in runs for n in r.notes)]
    if notes:
        lines += ["Notes:", "", *(f"* {n}" for n in notes), ""]
    lines += ["Experiments are read from git (`refs/exps`, HEAD) and the workspace when the `report` stage "
              "runs; `dvc exp show` gives the same numbers. Refresh after other experiments with "
              "`rtmdet report`.", ""]  # fmt: skip
    return "\n".join(lines), files
