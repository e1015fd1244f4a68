"""Checkpoints written by a background thread: the newest snapshot per file, errors raised on the
training thread, snapshots independent of the live tensors."""

from __future__ import annotations

import threading

import pytest
import torch

from rtmdet.training import ckpt_writer
from rtmdet.training.ckpt_writer import CheckpointWriter, host_copy


def test_host_copy_is_independent_of_the_training_tensors():
    w = torch.zeros(3)
    snap = host_copy({"model": {"w": w}, "list": [w], "tuple": (w, 1), "n": 5})
    w += 1  # training goes on in place
    assert snap["model"]["w"].tolist() == [0, 0, 0] and snap["list"][0].sum() == 0 and snap["tuple"][0].sum() == 0
    assert snap["n"] == 5 and snap["tuple"][1] == 1


def test_newest_snapshot_of_a_path_replaces_one_not_yet_written(tmp_path, monkeypatch):
    gate, written = threading.Event(), []
    real = ckpt_writer.save_atomic

    def slow_save(obj, path):
        gate.wait(10)  # the first write blocks while three more snapshots arrive
        written.append((path.name, obj["epoch"]))
        real(obj, path)

    monkeypatch.setattr(ckpt_writer, "save_atomic", slow_save)
    writer = CheckpointWriter()
    writer.write({"epoch": 1}, tmp_path / "last.pt")
    for _ in range(100):  # until the thread holds epoch 1
        if writer._busy is not None:
            break
        threading.Event().wait(0.01)
    writer.write({"epoch": 2}, tmp_path / "last.pt")
    writer.write({"epoch": 3}, tmp_path / "last.pt")
    writer.write({"epoch": 3}, tmp_path / "best.pt")
    gate.set()
    writer.close()
    assert written == [("last.pt", 1), ("last.pt", 3), ("best.pt", 3)]
    assert torch.load(tmp_path / "last.pt")["epoch"] == 3 and torch.load(tmp_path / "best.pt")["epoch"] == 3
    assert set(writer.seconds) == {tmp_path / "last.pt", tmp_path / "best.pt"}


def test_a_failed_write_is_raised_on_the_training_thread(tmp_path, caplog):
    (tmp_path / "last.pt").mkdir()  # a folder where the file should go: the rename fails
    writer = CheckpointWriter()
    writer.write({"epoch": 1}, tmp_path / "last.pt")
    with pytest.raises(OSError):
        writer.wait()
    writer.write({"epoch": 2}, tmp_path / "last.pt")
    writer.close(quiet=True)  # closing after another error logs this one instead of masking it
    assert "a checkpoint write failed" in caplog.text
