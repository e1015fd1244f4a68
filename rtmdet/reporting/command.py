"""`rtmdet report`: the report stage's pages outside DVC (after other experiments, say)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the report sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "report",
        help="write reports/README.md (this run) and reports/experiments.md (all experiments)",
        description="Write the report stage's pages: README.md with the current run's metrics, tables and "
                    "plots, and experiments.md comparing HEAD, every DVC experiment and the workspace "
                    "(params that differ, metrics, a bar chart). Run it in the project folder.",
    )  # fmt: skip
    p.add_argument("--reports", type=Path, default=Path("reports"), metavar="DIR",
                   help="the reports folder, read and written (default: reports)")  # fmt: skip
    p.add_argument("--params", type=Path, default=Path("params.yaml"), metavar="FILE",
                   help="the params file of the run (default: params.yaml)")  # fmt: skip
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Write the pages and say where they are."""
    from rtmdet.reporting.stage import write_reports

    written = write_reports(args.reports, args.params)
    print("\n".join(str(p) for p in written if p.suffix == ".md"))
    return 0
