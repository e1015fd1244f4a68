"""Training logs: dvclive curves that survive a resume without duplicated steps, and loss meters.

dvclive writes one row per `log_metric` to plots/metrics/<name>.tsv and the latest values (with
`step`) to metrics.json at `next_step()`. A kill between the two leaves rows past the summary's
step; on resume those rows are trimmed, and epochs already logged are not logged again (a
resumed run recomputes them bit for bit, so nothing is lost).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _summary_step(live_dir: Path) -> int:
    """The last step dvclive completed in live_dir, -1 when none."""
    try:
        return int(json.loads((live_dir / "metrics.json").read_text()).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1


def trim_rows_after(live_dir: Path, step: int) -> None:
    """Drop metric rows with a step past `step` from every .tsv under live_dir/plots/metrics."""
    for path in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        text = path.read_text(encoding="utf-8")
        rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:]
                            if len(r) > col and r[col].lstrip("-").isdigit() and int(r[col]) <= step]
        if len(kept) == len(rows):
            continue
        buf = io.StringIO()
        csv.writer(buf, delimiter="\t", lineterminator=os.linesep).writerows(kept)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, path)
        log.info("%s: dropped %d rows logged after the checkpoint", path, len(rows) - len(kept))


class LiveLogger:
    """dvclive for per-epoch metrics; a no-op when live_dir is None or dvclive is not installed."""

    def __init__(self, live_dir: Path | None, resume: bool):
        self.live: Any = None
        self.last_step = -1
        if live_dir is None:
            return
        try:
            from dvclive import Live
        except ImportError:
            log.warning("dvclive is not installed: training curves are only logged to the console")
            return
        live_dir = Path(live_dir)
        if resume:
            self.last_step = _summary_step(live_dir)
            trim_rows_after(live_dir, self.last_step)
        # DVC's own dvc.yaml declares these plots and metrics; dvclive must not write one or
        # save experiments by itself.
        self.live = Live(dir=str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=False, report=None)

    def log_epoch(self, epoch: int, metrics: dict[str, float | None]) -> None:
        """Log one epoch's values at step = epoch (0-based); epochs already on disk are skipped."""
        if self.live is None or epoch <= self.last_step:
            return
        self.live.step = epoch
        for name, value in metrics.items():
            if value is not None and math.isfinite(value):
                self.live.log_metric(name, float(value))
        self.live.next_step()
        self.last_step = epoch

    def close(self) -> None:
        """Write dvclive's final summary."""
        if self.live is not None:
            self.live.end()
            self.live = None


class LossMeter:
    """Running sums of the loss parts over an epoch (host floats, filled at sync points)."""

    NAMES = ("loss", "loss_cls", "loss_bbox", "loss_distill", "loss_mask")  # 0 without a teacher / masks

    def __init__(self, state: dict[str, float] | None = None):
        state = state or {}
        self.sums = [float(state.get(n, 0.0)) for n in self.NAMES]
        self.count = int(state.get("count", 0))
        self.last = [math.nan] * len(self.NAMES)

    def add(self, rows: list[list[float]]) -> None:
        """Add per-iteration rows of the NAMES' values."""
        for row in rows:
            self.sums = [s + v for s, v in zip(self.sums, row)]
        self.count += len(rows)
        if rows:
            self.last = [sum(r[i] for r in rows) / len(rows) for i in range(len(self.NAMES))]

    def means(self) -> dict[str, float]:
        """Epoch averages so far."""
        n = max(self.count, 1)
        return {name: s / n for name, s in zip(self.NAMES, self.sums)}

    def state_dict(self) -> dict[str, float]:
        """The sums, saved in mid-epoch checkpoints so the epoch average survives a resume."""
        return {**dict(zip(self.NAMES, self.sums)), "count": self.count}
