"""The whole training step as CUDA graphs: what it relies on (CPU) and what it does (GPU)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.models.checkpoint import read_checkpoint
from rtmdet.training import train
from rtmdet.training.assigner import DynamicSoftLabelAssigner
from rtmdet.training.ema import ExpMomentumEMA
from rtmdet.training.losses import make_priors
from rtmdet.training.optim import build_optimizer, optimizer_state
from rtmdet.training.step_graph import box_bucket

from conftest import rel_diff, run_gloo_ranks
from test_trainer import make_dataset


def test_box_buckets_are_powers_of_two_from_eight():
    assert [box_bucket(m) for m in (0, 1, 8, 9, 16, 17, 100, 128, 129)] == [8, 8, 8, 16, 16, 32, 128, 128, 256]


def test_padding_boxes_to_a_bucket_changes_no_assignment():
    # A graph per bucket is only the same training if the padded gts (label -1) change nothing.
    g = torch.Generator().manual_seed(0)
    priors = make_priors([(8, 8), (4, 4), (2, 2)])
    b, a, c = 3, priors.shape[0], 4
    logits = torch.randn(b, a, c, generator=g)
    xy = torch.rand(b, a, 2, generator=g) * 64
    pred = torch.cat([xy, xy + 4 + torch.rand(b, a, 2, generator=g) * 30], -1)
    gts = torch.tensor([[[4.0, 6.0, 40.0, 30.0], [20, 20, 60, 62], [-1, -1, -1, -1]],
                        [[1.0, 1.0, 63.0, 63.0], [-1, -1, -1, -1], [-1, -1, -1, -1]],
                        [[-1.0, -1.0, -1.0, -1.0]] * 3])
    labels = torch.tensor([[0, 3, -1], [2, -1, -1], [-1, -1, -1]])
    assigner = DynamicSoftLabelAssigner()
    plain = assigner(logits, pred, priors, gts, labels)
    padded = assigner(logits, pred, priors, torch.cat([gts, torch.full((b, 5, 4), -1.0)], 1),
                      torch.cat([labels, torch.full((b, 5), -1)], 1))
    assert plain.fg_mask.sum() > 0
    for name in ("labels", "bbox_targets", "assign_metrics", "fg_mask", "gt_inds"):
        assert torch.equal(getattr(plain, name), getattr(padded, name)), name


def test_ema_with_a_device_tensor_weight_matches_the_python_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    a, b = ExpMomentumEMA(model), ExpMomentumEMA(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 8, 8))  # moves BN's running statistics
        b.apply(model, torch.tensor(b.next_weight()))
        b.steps += 1
        a.update(model)
    for (k, x), y in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert rel_diff(y, x) < 1e-6, k  # lerp vs sub-mul-add: rounding only


def test_checkpointed_optimizer_state_has_float_learning_rates():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, 0.01, 0.05, torch.device("cpu"))
    for group in opt.param_groups:
        group["lr"] = torch.tensor(0.02)  # as StepGraphs sets it
    state = optimizer_state(opt)
    assert [g["lr"] for g in state["param_groups"]] == [pytest.approx(0.02)] * 2
    assert all(type(g["lr"]) is float for g in state["param_groups"])


@pytest.mark.gpu
@pytest.mark.parametrize("distill", [False, True], ids=["plain", "distilled"])
def test_a_graphed_step_trains_like_the_eager_one(tmp_path: Path, caplog, distill: bool):
    root = make_dataset(tmp_path / "data", n_train=16, n_valid=4)
    params = dict(epochs=3, batch_size=4, base_batch_size=4, lr=0.004, warmup_iters=4, stage2_epochs=1, workers=0,
                  val_interval=3, seed=0, device="cuda", amp="off", channels_last=False)
    args = (DataParams(root=str(root)), ModelParams(size="nano", imgsz=64))
    if distill:  # a teacher of one epoch; the graphs of stage 1 (distilling) and stage 2 differ
        teacher = train(*args, TrainParams(**{**params, "epochs": 1}, compile=False), tmp_path / "teacher",
                        progress=False)
        params["teacher"] = str(teacher.best)
    torch.backends.cudnn.deterministic = True
    try:
        eager = train(*args, TrainParams(**params, compile=False), tmp_path / "eager", progress=False)
        with caplog.at_level(logging.INFO):
            graphed = train(*args, TrainParams(**params, compile=True, compile_mode="graph"), tmp_path / "graph",
                            progress=False)
    finally:
        torch.backends.cudnn.deterministic = False
    assert any("captured the training step as CUDA graph 1" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    a, b = (read_checkpoint(r.last)["state_dict"] for r in (eager, graphed))
    # 12 steps of fp32 AdamW from the same start: only summation order differs (EMA lerp vs
    # sub-mul-add, fused kernels), far below what a wrong lr, EMA weight or stale box would move.
    worst = max(rel_diff(b[k], a[k]) for k in a if a[k].is_floating_point())
    assert worst < 1e-3, worst
    ts = read_checkpoint(graphed.last)["train_state"]
    assert all(type(g["lr"]) is float for g in ts["optimizer"]["param_groups"])


def _agree_on_rank(info) -> tuple:
    from rtmdet.training.distributed import HostMax, broadcast_module

    agree = HostMax(info)
    buckets = [agree(box_bucket(m)) for m in ((3, 20, 40) if info.rank == 0 else (9, 5, 300))]
    torch.manual_seed(info.rank)  # different weights per rank, until rank 0's are broadcast
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    net[1].running_mean.fill_(info.rank)
    broadcast_module(net, info)
    return buckets, [t.tolist() for t in net.state_dict().values()]


def test_ranks_agree_on_one_bucket_and_start_from_rank_0s_weights():
    # Graphs on several GPUs: each replay holds a captured all-reduce, so every rank must replay
    # the same bucket's graph at each step; and with no DDP wrapper, rank 0's weights are
    # broadcast at the start.
    results = run_gloo_ranks(_agree_on_rank)
    assert results[0][0] == results[1][0] == [16, 32, 512]
    assert results[0][1] == results[1][1]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_graphs_on_two_gpus_keep_the_ranks_in_step(tmp_path: Path, capfd):
    # Two ranks (train.gpus 2, the train stage's own launcher), each replaying graphs that hold
    # the gradient all-reduce. Every epoch's end compares the ranks' weights bit for bit
    # (TrainingError if they differ): with a lost all-reduce, each rank would step on its own
    # half of the batch and the run would stop at epoch 1.
    from rtmdet.training.launch import train_on_gpus

    root = make_dataset(tmp_path / "data", n_train=32, n_valid=4)
    params = dict(epochs=2, batch_size=4, base_batch_size=8, lr=0.004, warmup_iters=4, stage2_epochs=1, workers=0,
                  val_interval=2, seed=0, device="cuda", amp="off", channels_last=False, gpus=2, sync_bn=False)
    args = (DataParams(root=str(root)), ModelParams(size="nano", imgsz=64))
    graphed = train_on_gpus(*args, TrainParams(**params, compile=True, compile_mode="graph"), tmp_path / "graph",
                            progress=False)
    err = capfd.readouterr().err
    assert err.count("captured the training step as CUDA graph 1") >= 1 and "weights differ" not in err
    assert read_checkpoint(graphed.last)["train_state"]["finished"]
    # Not asserted, not yet explained: eager DDP from the same start ended elsewhere (max per-tensor
    # relative difference 2.2 after 8 steps; measured once on 2 H200s, kernels not deterministic).
    # Suspected: AdamW's first steps move a weight by about lr whatever its gradient's size, so
    # kernel noise in a near-zero gradient's sign decides them. Next: the same pair deterministic.


def test_closing_a_loader_stops_its_persistent_workers_at_once(tmp_path: Path):
    # Persistent workers left to the interpreter's exit cost up to 5 s each with a pin-memory
    # thread (torch's shutdown path): the trainer closes its loaders itself when a run ends.
    from rtmdet.data.coco import load_dataset
    from rtmdet.data.loader import TrainDataset, build_dataloader
    from rtmdet.data.pipeline import PipelineConfig

    root = make_dataset(tmp_path / "data", n_train=8, n_valid=2)
    records = load_dataset(root).splits["train"].records
    loader = build_dataloader(TrainDataset(records, PipelineConfig.for_size("nano", 64)), 4, num_workers=2)
    for _ in loader:
        pass
    workers = loader._iterator._workers
    assert len(workers) == 2 and all(w.is_alive() for w in workers)  # persistent: still there
    loader.close()
    assert not any(w.is_alive() for w in workers)
    loader.close()  # twice is harmless
