"""train.gpus and several nodes: the ranks a run starts, clear errors where there are no GPUs,
and two torchrun "nodes" on one machine (gloo over localhost) training as one run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtmdet.cli import main
from rtmdet.errors import ConfigError
from rtmdet.models.checkpoint import read_checkpoint
from rtmdet.training.launch import resolve_gpus

from test_trainer import make_dataset

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


@no_cuda
def test_gpus_on_a_machine_without_cuda():
    assert resolve_gpus("auto", "auto") == 1 and resolve_gpus(1, "cpu") == 1
    with pytest.raises(ConfigError, match=r"^train.gpus 2: this machine has no CUDA GPU; use train.gpus: auto$"):
        resolve_gpus(2, "auto")
    with pytest.raises(ConfigError, match=r"train.gpus 0: use auto or a number of GPUs"):
        resolve_gpus(0, "auto")


@no_cuda
def test_rtmdet_train_with_gpus_on_a_cpu_machine_is_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", n_train=4, n_valid=2)
    code = main(["train", "--data", str(root), "--gpus", "2", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: train.gpus 2: this machine has no CUDA GPU; use train.gpus: auto\n"
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_one_run_over_localhost(tmp_path):
    # What `torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT` does on two
    # machines, here twice on one: each "node" has its own output folder, rank 0 writes.
    root = make_dataset(tmp_path / "data", n_train=16, n_valid=4)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "-m", "rtmdet", "train", "--data", str(root), "--size", "nano", "--imgsz", "64", "--epochs", "1",
               "--batch-size", "4", "--device", "cpu", "--workers", "0", "--no-progress",
               "--set", "train.base_batch_size=4", "--set", "train.warmup_iters=2", "--set", "train.stage2_epochs=0",
               "--out", str(tmp_path / f"node{node}")]
        nodes.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n\n".join(log[-2000:] for log in logs)
    written = [d for d in (tmp_path / "node0", tmp_path / "node1") if (d / "last.pt").exists()]
    assert len(written) == 1, logs  # one run, one set of checkpoints
    state = read_checkpoint(written[0] / "last.pt")["train_state"]
    assert state["world_size"] == 2 and state["finished"]
    assert state["global_iter"] == 2  # 16 images / (4 per rank x 2 ranks)
    assert (written[0] / "best.pt").is_file()


@pytest.mark.slow
def test_the_stage_launcher_starts_the_ranks_itself(tmp_path, monkeypatch):
    # train_on_gpus's own path (elastic_launch, as for train.gpus: 2 on a GPU machine), with two
    # CPU ranks on gloo standing in for the GPUs this machine lacks.
    from rtmdet.config import DataParams, ModelParams, TrainParams
    from rtmdet.training import launch

    monkeypatch.delenv("RTMDET_RANK_START", raising=False)

    monkeypatch.setattr(launch, "resolve_gpus", lambda setting, device: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = make_dataset(tmp_path / "data", n_train=16, n_valid=4)
    tp = TrainParams(epochs=1, batch_size=4, base_batch_size=4, warmup_iters=2, stage2_epochs=0, workers=0,
                     device="cpu", gpus=2)
    result = launch.train_on_gpus(DataParams(root=str(root)), ModelParams(size="nano", imgsz=64), tp,
                                  tmp_path / "out", progress=False)
    assert result.best is not None and result.epochs == 1
    assert read_checkpoint(result.last)["train_state"]["world_size"] == 2


def test_ranks_spawn_unless_fork_is_asked_for_and_safe(monkeypatch):
    from rtmdet.training import launch

    def method(prelude: str, start: str | None) -> str:  # a fresh process: pytest's own has asked CUDA already
        code = f"{prelude}; from rtmdet.training import launch; print(launch.rank_start_method())"
        env = {k: v for k, v in os.environ.items() if k != "RTMDET_RANK_START"}
        if start:
            env["RTMDET_RANK_START"] = start
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              check=True).stdout.strip()

    assert method("import torch", None) == "spawn"
    assert method("import torch", "fork") == "fork"
    if torch.backends.cuda.is_built():  # asking the CUDA runtime marks forks bad (torch's own flag)
        assert method("import torch; torch.cuda.is_available()", "fork") == "spawn"
    monkeypatch.setenv("RTMDET_RANK_START", "forkserver")
    with pytest.raises(ConfigError, match="RTMDET_RANK_START"):
        launch.rank_start_method()
