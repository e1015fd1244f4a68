"""The training step: sync-free (one traceable graph), and a clean fallback when compiling fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.errors import ConfigError
from rtmdet.models import build_model
from rtmdet.models.checkpoint import read_checkpoint
from rtmdet.training import train
from rtmdet.training import trainer as trainer_mod
from rtmdet.training.build import compile_enabled, sync_bn_enabled
from rtmdet.training.losses import RTMDetLoss, make_priors

from test_trainer import make_dataset


def test_forward_assigner_and_losses_trace_as_one_graph():
    # A host sync (.item(), bool(tensor)) or a data-dependent shape (boolean indexing) would
    # split the graph: then the GPU waits for Python at every step. Tracing only: no compiler.
    net = build_model("nano", 3, image_size=64).train()
    loss = RTMDetLoss(net.strides)
    priors = make_priors([(8, 8), (4, 4), (2, 2)], net.strides)

    def sums(images, boxes, labels):
        cls, reg = net(net.normalize(images))
        return loss.sums(cls, reg, boxes, labels, priors=priors)

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 30.0], [-1, -1, -1, -1]], [[-1, -1, -1, -1]] * 2])
    labels = torch.tensor([[1, -1], [-1, -1]])  # the second image has no box at all
    explained = torch._dynamo.explain(sums)(images, boxes, labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_a_failing_compiler_trains_eagerly_with_one_warning(tmp_path: Path, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler found\nlong details")
        return call

    root = make_dataset(tmp_path / "data", n_train=8, n_valid=2)
    params = dict(epochs=1, batch_size=4, base_batch_size=4, warmup_iters=2, stage2_epochs=0, workers=0,
                  val_interval=1, seed=0, device="cpu")
    args = (DataParams(root=str(root)), ModelParams(size="nano", imgsz=64))
    eager = train(*args, TrainParams(**params, compile=False), tmp_path / "eager", progress=False)
    monkeypatch.setattr(trainer_mod.torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING):
        # compile_mode default: the model alone through inductor (a graph mode on the CPU trains eagerly)
        fallback = train(*args, TrainParams(**params, compile=True, compile_mode="default"), tmp_path / "fallback",
                         progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["torch.compile failed (inductor: no C++ compiler found); training without it "
                        "(train.compile: false skips it)"]
    a, b = (read_checkpoint(r.last)["state_dict"] for r in (eager, fallback))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same training as never compiling


def test_auto_settings_and_bad_values():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_enabled("auto", cuda) and not compile_enabled("auto", cpu) and compile_enabled(True, cpu)
    with pytest.raises(ConfigError, match="train.compile 'yes': use auto, true or false"):
        compile_enabled("yes", cpu)
    assert not sync_bn_enabled("auto", 8, 1, cuda)  # one rank: nothing to synchronize
    assert sync_bn_enabled("auto", 8, 2, cuda) and not sync_bn_enabled("auto", 16, 2, cuda)
    assert not sync_bn_enabled(True, 8, 2, cpu)  # SyncBatchNorm is CUDA-only
