"""Distillation: the loss on hand-made maps, the teacher's checks, and a distilled run end to end."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.errors import ConfigError
from rtmdet.models import build_model
from rtmdet.models.checkpoint import read_checkpoint
from rtmdet.training import train
from rtmdet.training.distill import Distiller, channel_wise_divergence, load_teacher, normalize_channels
from rtmdet.training.launch import train_with_teacher

from conftest import run_gloo_ranks
from test_trainer import make_dataset

REPO = Path(__file__).resolve().parents[1]


def test_cwd_of_hand_made_maps():
    same = torch.randn(2, 3, 4, 4)
    assert channel_wise_divergence(same, same).item() == pytest.approx(0.0, abs=1e-6)
    # One image, one channel, two positions: softmax(t) = (3/4, 1/4) against (1/2, 1/2).
    s, t = torch.zeros(1, 1, 1, 2), torch.tensor([math.log(3.0), 0.0]).view(1, 1, 1, 2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert channel_wise_divergence(s, t).item() == pytest.approx(kl, rel=1e-6)
    # tau 2 softens both and multiplies by 4; two channels (one identical) halve the mean.
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    soft = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert channel_wise_divergence(s, t, tau=2.0).item() == pytest.approx(soft, rel=1e-6)
    two_s, two_t = torch.cat([s, s], 1), torch.cat([t, s], 1)
    assert channel_wise_divergence(two_s, two_t).item() == pytest.approx(kl / 2, rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        channel_wise_divergence(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


def test_teacher_maps_are_normalized_per_channel():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 10.0, 0.5]).view(1, 3, 1, 1) + 7.0  # eps 1e-5 << var 0.25
    y = normalize_channels(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


def test_the_student_learns_through_adapters_and_the_teacher_stays_frozen():
    torch.manual_seed(0)
    student, teacher = build_model("nano", 3, image_size=64).train(), build_model("tiny", 3, image_size=64)
    distiller = Distiller(teacher, student, weight=2.0)
    x = torch.randn(2, 3, 64, 64)
    student(x)
    loss = distiller.loss(x)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.adapters.parameters())
    assert student.neck.out_convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert not any(k.startswith("teacher") for k in distiller.state_dict())  # only the adapters are saved
    with pytest.raises(RuntimeError, match="did not run"):
        distiller.loss(x)  # the student's maps of that forward were used already


def _save(model, path: Path, classes: list[str]) -> Path:
    from rtmdet.models.checkpoint import save_atomic

    save_atomic({"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": classes}},
                 "model_config": model.cfg.to_dict()}, path)
    return path


def test_a_teacher_of_other_classes_or_no_file_is_one_clear_line(tmp_path: Path):
    other = _save(build_model("tiny", 2, image_size=64), tmp_path / "two.pt", ["cat", "dog"])
    with pytest.raises(ConfigError, match=r"train.teacher .*two.pt: its classes \(cat, dog\) are not the dataset's "
                                          r"\(a, b, c\); a teacher must be trained on the same classes"):
        load_teacher(other, ["a", "b", "c"])
    root = make_dataset(tmp_path / "data", n_train=4, n_valid=2)
    params = TrainParams(epochs=1, batch_size=2, device="cpu", workers=0, teacher=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match=r"nope.pt: no such checkpoint file, and not a model size \(nano, tiny"):
        train_with_teacher(DataParams(root=str(root)), ModelParams(size="nano", imgsz=64), params,
                           tmp_path / "run", tmp_path / "teacher")
    proc = subprocess.run([sys.executable, "-m", "rtmdet", "train", "--data", str(root), "--size", "nano",
                           "--imgsz", "64", "--epochs", "1", "--device", "cpu", "--teacher", str(other),
                           "--out", str(tmp_path / "cli")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "its classes (cat, dog) are not the dataset's" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _distill_params(**kw) -> TrainParams:
    base = dict(epochs=3, batch_size=4, base_batch_size=4, warmup_iters=2, stage2_epochs=1, workers=0,
                val_interval=3, seed=0, device="cpu", teacher="nano", teacher_epochs=1, ckpt_interval_s=0.0,
                log_interval=1)
    return TrainParams(**{**base, **kw})


def test_a_size_teacher_trains_first_and_a_killed_student_resumes(tmp_path: Path, caplog):
    root = make_dataset(tmp_path / "data", n_train=8, n_valid=4)
    data, model = DataParams(root=str(root)), ModelParams(size="nano", imgsz=64)
    ref, teacher = train_with_teacher(data, model, _distill_params(), tmp_path / "ref", tmp_path / "teacher")
    assert teacher is not None and teacher.best is not None and teacher.epochs == 1
    assert (tmp_path / "teacher" / "best.pt").is_file()
    ts = read_checkpoint(ref.last)["train_state"]
    assert ts["distill_adapters"] and ts["meters"]["loss_distill"] == 0.0  # stage 2 (epoch 3): no teacher
    # The same student, stopped after epoch 1 of 3 (epoch 2 distills too) and resumed from its
    # last.pt: the adapters and their AdamW state come back, so the weights match bit for bit.
    stopped = tmp_path / "stopped"
    params = _distill_params(teacher=str(teacher.best))
    import rtmdet.training.trainer as trainer_mod

    calls = {"n": 0}
    original = trainer_mod._Run._end_epoch

    def stop_after_one(self, epoch):
        original(self, epoch)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # as a kill right after epoch 1's checkpoint

    trainer_mod._Run._end_epoch = stop_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            train(data, model, params, stopped, progress=False)
    finally:
        trainer_mod._Run._end_epoch = original
    assert read_checkpoint(stopped / "last.pt")["train_state"]["epoch"] == 1
    resumed = train(data, model, params, stopped, progress=False)
    assert resumed.resumed
    a, b = read_checkpoint(ref.last)["state_dict"], read_checkpoint(resumed.last)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _average_on_rank(info) -> list:
    from rtmdet.training.distributed import average_gradients

    adapters = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, bias=False), torch.nn.BatchNorm2d(3))
    for p in adapters.parameters():
        p.grad = torch.full_like(p, float(info.rank + 1))
    average_gradients(adapters, info)
    return [p.grad.unique().tolist() for p in adapters.parameters()]


def test_adapter_gradients_are_averaged_over_ranks():
    # The adapters live outside DDP, so each rank's gradients are averaged by hand after backward.
    results = run_gloo_ranks(_average_on_rank)
    assert results == [[[1.5], [1.5], [1.5]]] * 2
