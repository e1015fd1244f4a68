"""Training curves from dvclive's per-metric files (reports/train/plots/metrics/**/*.tsv).

The trainer logs one row per epoch at step = epoch (0-based): train/loss, train/loss_cls,
train/loss_bbox, train/lr, and val/mAP, val/mAP50 on validation epochs. The figure plots them
against the 1-based epoch, as the training log prints it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def read_live_metrics(folder: Path) -> dict[str, pd.Series]:
    """{"train/loss": values indexed by step, ...} from every readable .tsv under folder."""
    series: dict[str, pd.Series] = {}
    for path in sorted(Path(folder).rglob("*.tsv")):
        name = path.relative_to(folder).with_suffix("").as_posix()
        try:
            frame = pd.read_csv(path, sep="\t")
            column = path.stem if path.stem in frame.columns else frame.columns[-1]
            values = pd.to_numeric(frame[column], errors="coerce")
            steps = pd.to_numeric(frame["step"], errors="coerce")
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
            log.warning("%s: skipped, not a dvclive metrics file (%s)", path, exc)
            continue
        ok = values.notna() & steps.notna()
        if ok.any():
            series[name] = pd.Series(values[ok].to_numpy(), index=steps[ok].astype(int).to_numpy(), name=name)
    return series


def _panels(series: dict[str, pd.Series]) -> list[tuple[str, str, list[str]]]:
    """(title, y label, metric names) per axes: losses, learning rate, validation, anything else."""
    def pick(test) -> list[str]:
        return [n for n in series if test(n.rsplit("/", 1)[-1], n)]

    losses = pick(lambda leaf, n: leaf.startswith("loss"))
    lrs = pick(lambda leaf, n: leaf == "lr")
    val = pick(lambda leaf, n: n.startswith("val/") and n not in losses)
    rest = [n for n in series if n not in {*losses, *lrs, *val}]
    panels = [("Training loss (epoch mean)", "loss", losses), ("Learning rate (end of epoch)", "lr", lrs),
              ("Validation", "score (COCO mAP, or top-1)", val), ("Other", "value", rest)]  # fmt: skip
    return [p for p in panels if p[2]]


def training_figure(series: dict[str, pd.Series]) -> Figure | None:
    """One axes per panel side by side (two rows past three panels); None without data."""
    from matplotlib.figure import Figure

    panels = _panels(series)
    if not panels:
        return None
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    first = min(int(s.index.min()) for s in series.values()) + 1
    last = max(int(s.index.max()) for s in series.values()) + 1
    pad = max(0.5, 0.02 * (last - first))
    for ax, (title, ylabel, names) in zip(axes, panels, strict=False):
        _draw(ax, series, names, title, ylabel)
        ax.set_xlim(first - pad, last + pad)  # the same epochs on every axes, validated or not
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Training curves", fontsize=13)
    return fig


def _draw(ax: Axes, series: dict[str, pd.Series], names: list[str], title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for name in names:
        s = series[name]
        few = len(s) <= 12  # sparse points (validation every N epochs): mark them
        ax.plot(s.index + 1, s.to_numpy(), marker="o" if few else None, ms=4, lw=1.6, label=name)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ylabel == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if ylabel.startswith("score"):
        ax.set_ylim(0, max(1e-3, max(float(series[n].max()) for n in names)) * 1.1)
    if len(names) > 1 or ylabel != "lr":
        # Under the axes: inside, the legend would sit on the curves it names.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(names), 3), fontsize=9,
                  frameon=False)  # fmt: skip
