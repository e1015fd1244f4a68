"""One uninterrupted `dvc repro` of the tiny project, shared by the pipeline tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import project


@dataclass
class Reference:
    """The project after one uninterrupted `dvc repro`, and its metrics at that moment (later
    tests change the project; the snapshot stays what an uninterrupted run gives)."""

    root: Path
    metrics: dict[str, dict]
    artifacts: dict[str, str]
    log: str


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    if not project.available():
        pytest.skip("git and dvc are needed for the pipeline tests")
    root = project.make_project(tmp_path_factory.mktemp("pipeline"))
    log = project.run([project.dvc(), "repro"], root)
    return Reference(root, project.read_metrics(root), project.artifact_hashes(root), log)
