"""The trainer: exact resume after SIGKILL, fingerprints, NaN stop, checkpoints, DDP, overfitting."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.errors import ConfigError
from rtmdet.training import TrainingError, train
from rtmdet.training import epoch_end
from rtmdet.training import tasks

REPO = Path(__file__).resolve().parents[1]
COLORS = [(40, 40, 220), (40, 200, 40)]


def make_dataset(root: Path, n_train: int = 16, n_valid: int = 6, size: int = 64, seed: int = 0,
                 obj: tuple[int, int] = (14, 40), apart: bool = False) -> Path:
    """A Roboflow-layout dataset: noisy grey images with 1-3 red or green rectangles (with
    `apart`, each in its own quadrant, so none hides another: every box can be learned)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img = (np.full((size, size, 3), 90) + rng.integers(0, 30, (size, size, 3))).astype(np.uint8)
            quadrants = rng.permutation(4) if apart else None
            for k in range(int(rng.integers(1, 4))):
                w, h = (int(v) for v in rng.integers(obj[0], obj[1], 2))
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                if apart:
                    half = size // 2
                    qx, qy = divmod(int(quadrants[k]), 2)
                    x, y = qx * half + int(rng.integers(0, half - w + 1)), qy * half + int(rng.integers(0, half - h + 1))
                c = int(rng.integers(0, 2))
                img[y:y + h, x:x + w] = COLORS[c]
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0})
            cv2.imwrite(str(folder / f"{split}_{i}.png"), img)
            images.append({"id": i, "file_name": f"{split}_{i}.png", "width": size, "height": size})
        cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
        (folder / "_annotations.coco.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                   "categories": cats}))
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one intra-op thread is as fast on an idle machine and far faster on a busy
    # one (spinning OpenMP threads); the subprocesses get the same count, so results agree.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _params(root: Path, **train_kw) -> tuple[DataParams, ModelParams, TrainParams]:
    base = dict(epochs=3, batch_size=4, base_batch_size=4, warmup_iters=4, stage2_epochs=1, workers=0,
                val_interval=1, seed=0, device="cpu")
    return (DataParams(root=str(root)), ModelParams(size="nano", imgsz=64),
            TrainParams(**{**base, **train_kw}))


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_params(path: Path, root: Path, **train_kw) -> Path:
    import yaml

    data, model, tp = _params(root, **train_kw)
    from rtmdet.config import as_dict

    path.write_text(yaml.safe_dump({"data": as_dict(data), "model": as_dict(model), "train": as_dict(tp)}))
    return path


def _cli(params: Path, out: Path) -> list[str]:
    script = ("import argparse, logging, sys; from rtmdet.training import command; "
              "logging.basicConfig(level=logging.INFO); p = argparse.ArgumentParser(); "
              "command.add_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    return [sys.executable, "-c", script, "train", "--params", str(params), "--out", str(out), "--no-progress"]


def _env() -> dict[str, str]:
    # The same intra-op thread count as this process (_one_thread), so float sums are ordered alike.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_killed_run_resumes_mid_epoch_to_the_same_weights_and_curves(data_root: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # Reference: uninterrupted, in this process, with the default checkpoint/log cadence (neither
    # may change the result).
    ref = train(*_params(data_root), tmp_path / "ref", live_dir=tmp_path / "ref" / "live", progress=False)
    assert ref.best is not None and not ref.resumed

    # Same run in a subprocess writing last.pt at every iteration, SIGKILLed by its own kill point
    # at the 7th step (epoch 2, batch 3 of 4): after that step, before its checkpoint. Polling
    # last.pt from here raced the run: with prefetch across epochs it sometimes ended first.
    out = tmp_path / "killed"
    params = _write_params(tmp_path / "params.yaml", data_root, ckpt_interval_s=0.0, log_interval=1)
    proc = subprocess.run(_cli(params, out), cwd=REPO, env={**_env(), "RTMDET_KILL_AT": "train:step#7"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    killed = _state(out / "last.pt")["train_state"]
    assert killed["epoch"] == 1 and 0 < killed["batch"] < 4, "the kill must land mid-epoch"

    # Resume here (same thread count, so the same float results as the subprocess would give).
    caplog.set_level(logging.INFO)
    resumed = train(*_params(data_root, ckpt_interval_s=0.0, log_interval=1), out, live_dir=out / "dvclive",
                    progress=False)
    assert resumed.resumed and not resumed.already_finished
    assert f"resuming {out / 'last.pt'} at epoch 2, batch {killed['batch']} of 4" in caplog.text

    a, b = _state(tmp_path / "ref" / "last.pt"), _state(out / "last.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # EMA weights, bit for bit
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["train_state"]["model"]:  # raw weights too
        assert torch.equal(a["train_state"]["model"][key], b["train_state"]["model"][key]), key
    timing = ("images_per_s",)
    assert ({k: v for k, v in a["train_state"]["last_metrics"].items() if k not in timing}
            == {k: v for k, v in b["train_state"]["last_metrics"].items() if k not in timing})
    assert a["meta"]["mAP"] == b["meta"]["mAP"] and b["train_state"]["finished"]
    # dvclive resumed without duplicated or missing steps, with the same values.
    for name in ("train/loss.tsv", "train/loss_cls.tsv", "train/lr.tsv", "val/mAP.tsv", "val/mAP50.tsv"):
        ref_rows = (tmp_path / "ref" / "live" / "plots" / "metrics" / name).read_text()
        got_rows = (out / "dvclive" / "plots" / "metrics" / name).read_text()
        assert got_rows == ref_rows, name
        assert [r.split("\t")[0] for r in got_rows.splitlines()[1:]] == ["0", "1", "2"]


def test_finished_run_returns_at_once_and_changed_params_start_over(data_root: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    first = train(*_params(data_root, epochs=1, stage2_epochs=0), out, progress=False)
    ckpt = _state(out / "last.pt")
    meta = ckpt["meta"]
    assert set(meta) >= {"rtmdet", "dataset_meta", "params", "epoch", "iter", "mAP", "mmdet_compatible"}
    assert meta["dataset_meta"] == {"classes": ["red", "green"], "category_ids": [1, 2]}
    assert meta["epoch"] == 1 and meta["iter"] == 4 and meta["params"]["train"]["epochs"] == 1
    assert set(_state(out / "best.pt")) == {"state_dict", "meta"}  # what users ship: no train state
    from rtmdet.models.checkpoint import load_model

    model, _ = load_model(out / "best.pt")  # mmdetection layout, strict keys
    assert model.cfg.num_classes == 2 and model.cfg.image_size == 64

    mtime = (out / "last.pt").stat().st_mtime_ns
    t = time.perf_counter()
    again = train(*_params(data_root, epochs=1, stage2_epochs=0, workers=3, val_interval=5), out, progress=False)
    assert again.already_finished and time.perf_counter() - t < 5
    assert again.best_mAP == first.best_mAP and (out / "last.pt").stat().st_mtime_ns == mtime

    caplog.set_level(logging.INFO)
    changed = train(*_params(data_root, epochs=1, stage2_epochs=0, lr=0.002), out, progress=False)
    assert not changed.resumed and not changed.already_finished
    assert "belongs to another run (train.lr 0.004 -> 0.002)" in caplog.text
    assert _state(out / "last.pt")["meta"]["params"]["train"]["lr"] == 0.002


@pytest.mark.parametrize("share, expected", [(0, [1, 2, 3]), (1e9, [1, 3])])
def test_epoch_end_writes_of_last_pt_skip_epochs_shorter_than_the_write_budget(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: float, expected: list[int]) -> None:
    # WRITE_SHARE 0: every epoch writes last.pt. Huge: an epoch is always "too short" for its write,
    # so only the first epoch (no write timed yet) and the finished run write it; the result is the same.
    # (Counted as snapshots handed to the background writer, which may skip one a newer replaces.)
    from rtmdet.training.ckpt_writer import CheckpointWriter

    writes: list[int] = []
    real = CheckpointWriter.write

    def spy(self, obj, path):
        if Path(path).name == "last.pt":
            writes.append(obj["train_state"]["epoch"])
        real(self, obj, path)

    monkeypatch.setattr(epoch_end, "WRITE_SHARE", share)
    monkeypatch.setattr(CheckpointWriter, "write", spy)
    result = train(*_params(data_root, ckpt_interval_s=1e6, log_interval=100), tmp_path / "run", progress=False)
    assert writes == expected
    assert _state(result.last)["train_state"]["finished"]


def test_best_pt_holds_the_weights_validated_even_when_scored_an_epoch_later(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Scores arrive while the next epoch trains; best.pt must be the weights as they were at the
    # validation (here epoch 2's, the best score), not as they are when the score comes (epoch 3's
    # end: no last.pt write in between, which would take the score at once).
    from rtmdet.training.validate import Validator

    scores = iter([0.3, 0.5, 0.1])
    real_collect = Validator.collect

    def fake_collect(self, future):
        metrics = real_collect(self, future)
        return {**metrics, "mAP": next(scores)}

    snapshots: list[dict[str, torch.Tensor]] = []
    real_best = epoch_end.EpochEndMixin._best_checkpoint

    def spy_best(self, epoch):
        ckpt = real_best(self, epoch)
        snapshots.append({k: v.clone() for k, v in ckpt["state_dict"].items()})
        return ckpt

    monkeypatch.setattr(Validator, "collect", fake_collect)
    monkeypatch.setattr(epoch_end.EpochEndMixin, "_best_checkpoint", spy_best)
    monkeypatch.setattr(epoch_end, "WRITE_SHARE", 1e9)
    result = train(*_params(data_root, ckpt_interval_s=1e6), tmp_path / "run", progress=False)
    assert (result.best_epoch, result.best_mAP) == (2, 0.5)
    best = _state(result.best)
    assert best["meta"]["epoch"] == 2 and best["meta"]["mAP"] == 0.5
    assert len(snapshots) == 3
    assert all(torch.equal(best["state_dict"][k], v) for k, v in snapshots[1].items())
    assert not all(torch.equal(best["state_dict"][k], v) for k, v in snapshots[2].items())


def test_assigner_topk_and_resize_range_reach_the_loss_and_the_pipeline(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rtmdet.data.pipeline import PipelineConfig
    from rtmdet.training import trainer as trainer_module

    configs: list[PipelineConfig] = []
    real = PipelineConfig.for_size.__func__

    def spy(cls, size, imgsz, ratio_range=None):
        configs.append(real(cls, size, imgsz, ratio_range))
        return configs[-1]

    monkeypatch.setattr(PipelineConfig, "for_size", classmethod(spy))
    seen = {}
    real_build = trainer_module._Run._build_data

    def spy_build(self):
        real_build(self)
        seen["topk"] = self.criterion.assigner.topk
        seen["ratio"] = self.loader.dataset.config.ratio_range

    monkeypatch.setattr(trainer_module._Run, "_build_data", spy_build)
    train(*_params(data_root, epochs=1, stage2_epochs=0, assigner_topk=5, resize_range=[0.8, 1.25]),
          tmp_path / "run", progress=False)
    assert seen == {"topk": 5, "ratio": (0.8, 1.25)} and configs[0].ratio_range == (0.8, 1.25)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    class PoisonedLoss(tasks.RTMDetLoss):
        def normalize(self, *args, **kwargs):  # the trainer's last loss step (after `sums`)
            out = super().normalize(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 7:  # global iteration 6: epoch 2, batch 3
                out = {**out, "loss": out["loss"] * float("nan"), "loss_cls": out["loss_cls"] * float("nan")}
            return out

    poisoned = replace(tasks.TRAIN_TASKS["detect"], loss=lambda net, p: PoisonedLoss(net.strides, topk=p.assigner_topk))
    monkeypatch.setitem(tasks.TRAIN_TASKS, "detect", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError) as err:
        train(*_params(data_root, ckpt_interval_s=0.0, log_interval=2), out, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert "epoch 2, iteration 3/4 (global 6): non-finite loss nan (loss_cls nan, loss_bbox" in msg
    ts = _state(out / "last.pt")["train_state"]
    assert (ts["epoch"], ts["batch"], ts["global_iter"]) == (1, 2, 6)  # written before the bad step
    assert all(torch.isfinite(v).all() for v in ts["model"].values() if v.is_floating_point())
    assert _state(out / "best.pt")["meta"]["epoch"] == 1


def test_init_from_a_checkpoint_with_other_classes(data_root: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from conftest import random_detector_checkpoint

    ckpt = random_detector_checkpoint(tmp_path / "init.pt", classes=("a", "b", "c"))
    data, model, tp = _params(data_root, epochs=1, stage2_epochs=0, val_interval=0)
    caplog.set_level(logging.INFO)
    result = train(data, replace(model, init=str(ckpt)), tp, tmp_path / "out", progress=False)
    assert "re-initialized the class predictors" in caplog.text
    assert _state(result.last)["state_dict"]["bbox_head.rtm_cls.0.weight"].shape[0] == 2


def test_cli_overrides_are_checked_like_params_yaml(tmp_path: Path) -> None:
    import argparse

    from rtmdet.training import command

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    params = _write_params(tmp_path / "p.yaml", tmp_path)
    args = parser.parse_args(["train", "--params", str(params), "--epochs", "7", "--imgsz", "96",
                              "--set", "train.lr=0.01", "--set", "train.grad_clip=10"])
    got = command.resolve_params(args)
    assert (got["train"].epochs, got["model"].imgsz, got["train"].lr, got["train"].grad_clip) == (7, 96, 0.01, 10.0)
    with pytest.raises(ConfigError, match="train.lrr"):
        command.resolve_params(parser.parse_args(["train", "--params", str(params), "--set", "train.lrr=1"]))
    with pytest.raises(ConfigError, match="train.amp must be str, got False .YAML reads an unquoted off"):
        command.resolve_params(parser.parse_args(["train", "--params", str(params), "--set", "train.amp=off"]))
    quoted = command.resolve_params(parser.parse_args(["train", "--params", str(params), "--set", "train.amp='off'"]))
    assert quoted["train"].amp == "off"


def test_dvclive_resume_drops_rows_past_the_last_completed_step(tmp_path: Path) -> None:
    from rtmdet.training.logs import LiveLogger

    live_dir = tmp_path / "live"
    first = LiveLogger(live_dir, resume=False)
    for epoch in range(2):
        first.log_epoch(epoch, {"train/loss": 1.0 + epoch, "val/mAP": None})
    first.close()
    # A kill between log_metric and next_step leaves a row of step 2 the summary does not have.
    tsv = live_dir / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.write_text(tsv.read_text() + "2\t9.0\n")
    again = LiveLogger(live_dir, resume=True)
    again.log_epoch(1, {"train/loss": 5.0})  # already logged: skipped, not duplicated
    again.log_epoch(2, {"train/loss": 3.0})
    again.close()
    rows = [r.split("\t") for r in tsv.read_text().splitlines()]
    assert rows == [["step", "loss"], ["0", "1.0"], ["1", "2.0"], ["2", "3.0"]]
    assert json.loads((live_dir / "metrics.json").read_text())["step"] == 2


# ---- DDP on CPU (gloo) ----------------------------------------------------------------------
def _frozen_bn_steps(images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, ddp: bool) -> dict:
    """First-step gradients and the weights after three AdamW steps of a nano with BatchNorm frozen."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    from rtmdet.models import build_model
    from rtmdet.training.losses import RTMDetLoss
    from rtmdet.training.optim import build_optimizer

    torch.manual_seed(0)
    net = build_model("nano", 2, image_size=64)
    with torch.no_grad():
        for conv in net.bbox_head.rtm_reg:
            conv.bias.fill_(1.0)  # real boxes from the start, so the box loss has gradients
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers' rename in newer torch
        fwd = DistributedDataParallel(net, broadcast_buffers=False) if ddp else net
    opt = build_optimizer(net, 1e-3, 0.05, torch.device("cpu"))
    loss_fn = RTMDetLoss(net.strides)
    grads = {}
    for step in range(3):
        cls, reg = fwd(net.normalize(images))
        loss_fn(cls, reg, boxes, labels)["loss"].backward()
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"grads": grads, "weights": {k: v.detach().clone() for k, v in net.state_dict().items()}}


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 30.0], [30.0, 30.0, 60.0, 62.0]]]).repeat(4, 1, 1)
    labels = torch.tensor([[0, 1], [1, -1], [0, 0], [1, 0]])
    return images, boxes, labels


def _ddp_worker(rank: int, world: int, port: int, root: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, boxes, labels = _fixed_batch()
        half = slice(2 * rank, 2 * rank + 2)
        torch.save(_frozen_bn_steps(images[half], boxes[half], labels[half], ddp=True), Path(tmp) / f"steps{rank}.pt")
        # The trainer itself under two ranks (it finds the group already started).
        result = train(*_params(Path(root), epochs=2, stage2_epochs=1), Path(tmp) / "ddp", progress=False)
        torch.save({"best": result.best_mAP, "resumed": result.resumed}, Path(tmp) / f"train{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_match_one_rank_with_the_total_batch(data_root: Path, tmp_path: Path) -> None:
    # Exact equality needs batch statistics over the whole batch: SyncBatchNorm, which is CUDA
    # only. On CPU each rank normalizes with its own half, so the step comparison freezes BN;
    # what remains (gradient all-reduce, the loss normalizer averaged across ranks, the
    # optimizer) must then give the one-process weights.
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(data_root), str(tmp_path)), nprocs=2)
    images, boxes, labels = _fixed_batch()
    single = _frozen_bn_steps(images, boxes, labels, ddp=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"steps{rank}.pt")
        # Gradients: the all-reduced mean of the halves equals the whole batch's (this is where a
        # wrong loss normalizer or world-size factor would show; Adam itself is scale-invariant).
        for name, g in single["grads"].items():
            tol = 1e-4 * g.abs().max().item() + 1e-12
            assert torch.allclose(got["grads"][name], g, rtol=0, atol=tol), (rank, name)
        # Weights after three steps agree to a small fraction of the lr: Adam divides by sqrt(v),
        # so rounding differences in near-zero gradients move a weight by up to ~0.1 lr.
        for key, value in single["weights"].items():
            if value.is_floating_point():
                assert torch.allclose(got["weights"][key], value, rtol=0, atol=3e-4), (rank, key)
    # The trainer: total batch 2 x 4 -> lr scaled by 8/4; only rank 0 validates and writes.
    ckpt = _state(tmp_path / "ddp" / "last.pt")
    assert ckpt["train_state"]["world_size"] == 2 and ckpt["train_state"]["lr"] == pytest.approx(0.008)
    assert ckpt["train_state"]["global_iter"] == 2 * 2  # 16 images / (4 x 2 ranks) per epoch
    assert torch.load(tmp_path / "train0.pt")["best"] is not None
    assert torch.load(tmp_path / "train1.pt")["best"] is None
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["best.pt", "last.pt"]


def _repeat_train_split(root: Path, times: int) -> None:
    """Validate on the training images; train on `times` copies of each (fewer, longer epochs)."""
    ann = json.loads((root / "train" / "_annotations.coco.json").read_text())
    for f in (root / "train").iterdir():
        (root / "valid" / f.name).write_bytes(f.read_bytes())
    images, anns = [], []
    for k in range(times):
        for img in ann["images"]:
            name = f"copy{k}_{img['file_name']}"
            (root / "train" / name).write_bytes((root / "train" / img["file_name"]).read_bytes())
            images.append({**img, "id": k * 1000 + img["id"], "file_name": name})
        anns += [{**a, "id": k * 1000 + a["id"], "image_id": k * 1000 + a["image_id"]} for a in ann["annotations"]]
    (root / "train" / "_annotations.coco.json").write_text(json.dumps({**ann, "images": images, "annotations": anns}))


@pytest.mark.slow
def test_overfits_a_handful_of_images(tmp_path: Path) -> None:
    # 4 images with 1-3 boxes (10 in all, none hiding another); stage-2 pipeline only, 300 iterations.
    root = make_dataset(tmp_path / "data", n_train=4, n_valid=0, size=96, seed=3, obj=(20, 44), apart=True)
    _repeat_train_split(root, 4)
    data = DataParams(root=str(root))
    model = ModelParams(size="nano", imgsz=96)
    tp = TrainParams(epochs=75, batch_size=4, base_batch_size=4, lr=0.01, warmup_iters=30, stage2_epochs=75,
                     workers=0, val_interval=0, stage2_val_interval=0, seed=0, device="cpu", log_interval=50)
    result = train(data, model, tp, tmp_path / "out", progress=False)
    assert result.metrics["num_images"] == 4
    # Another CPU's rounding sends training down another trajectory, as another seed does: 12 runs
    # (seeds 0-5 at 1 thread, 0-3, 8, 9 at 2) all reached mAP50 1.000 and mAP 0.74-0.86. One box missed
    # per class would give ~0.8; an untrained model scores ~0. (lr 0.004 stalled on red vs green
    # in some runs, at mAP50 0.70-0.88: too slow to be a test.)
    assert result.metrics["mAP50"] >= 0.75 and result.metrics["mAP"] >= 0.5, result.metrics
