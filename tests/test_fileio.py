"""Atomic writes: a process killed mid-write leaves the old file intact and only a temporary
beside it, which the next run removes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rtmdet.fileio import remove_stale_temporaries, write_atomic

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import sys
from pathlib import Path
from rtmdet.fileio import write_atomic
write_atomic(Path(sys.argv[1]), b"new" * 1000)
"""


def test_a_kill_mid_write_keeps_the_old_file_and_the_next_run_cleans_up(tmp_path):
    target = tmp_path / "model.tflite"
    write_atomic(target, b"old")
    env = {**os.environ, "RTMDET_KILL_AT": "write:model.tflite", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WRITER, str(target)], env=env, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL  # killed at the named point, half the bytes written
    assert target.read_bytes() == b"old"
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]
    assert leftover.name.startswith(".model.tflite.") and leftover.stat().st_size == 1500
    assert remove_stale_temporaries(tmp_path) == 1 and list(tmp_path.iterdir()) == [target]


def test_an_unset_or_other_kill_point_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RTMDET_KILL_AT", "write:other.pt")
    write_atomic(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 1
