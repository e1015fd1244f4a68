"""DVC stage `report`: reports/README.md (this run) and reports/experiments.md (all experiments)."""

from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.reporting.stage import SECTIONS, write_reports


def main() -> None:
    params = load_params(sections=SECTIONS)
    write_reports(Path("reports"), Path("params.yaml"), params=params)


if __name__ == "__main__":
    run_stage(main)
