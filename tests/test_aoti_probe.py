"""The AOTInductor export's check runs the package in a process of its own: a package that does
not load, or a runtime that crashes, fails the export with one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rtmdet.export import ExportError
from rtmdet.export import aoti_probe


def test_a_package_that_does_not_load_is_one_line(tmp_path):
    bad = tmp_path / "m.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ExportError, match=r"m.pt2: the AOTInductor package did not run: .*not an AOTInductor package"):
        aoti_probe.run_probe(bad, "cpu", np.zeros((1, 3, 8, 8), np.uint8))


def test_a_crash_in_the_runtime_is_one_line_not_a_dead_export(tmp_path, monkeypatch):
    real = subprocess.run
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    monkeypatch.setattr(aoti_probe.subprocess, "run", lambda command, **kw: real(crash, **kw))
    with pytest.raises(ExportError, match=r"m.pt2: torch's AOTInductor runtime crashed \(SIGSEGV\) .* compiled for cuda"):
        aoti_probe.run_probe(tmp_path / "m.pt2", "cuda", np.zeros((1, 3, 8, 8), np.uint8))
