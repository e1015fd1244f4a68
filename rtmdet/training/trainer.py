"""The training loop: mmdetection's RTMDet recipe in plain PyTorch, resumable, single or multi-GPU.

Per iteration: uint8 batch -> device (non_blocking from pinned memory) -> normalize on the device
-> forward under autocast -> RTMDetLoss -> backward (scaled with fp16) -> optional clipping ->
AdamW step -> EMA update. The host reads values back only every `log_interval` iterations (progress
bar, NaN/inf check, mid-epoch checkpoint), so the GPU is never stalled by per-step `.item()`s.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.data.loader import TrainBatchSampler, build_dataloader, set_epochs
from rtmdet.data.records import DetectionDataset
from rtmdet.errors import ConfigError
from rtmdet.failpoints import armed, kill_point
from rtmdet.fileio import remove_stale_temporaries
from rtmdet.training import distributed as dist_utils
from rtmdet.training import state as st
from rtmdet.training.build import (
    GRAPH_MODES,
    amp_dtype,
    check_train_params,
    compile_enabled,
    seed_everything,
    sync_bn_enabled,
)
from rtmdet.training.distill import Distiller, load_teacher
from rtmdet.training.ema import ExpMomentumEMA
from rtmdet.training.logs import LiveLogger, LossMeter
from rtmdet.training.losses import make_priors
from rtmdet.training.optim import LrSchedule, build_optimizer, scaled_lr
from rtmdet.training.phases import Phases
from rtmdet.training.state import TrainingError, TrainResult
from rtmdet.training.tasks import train_task
from rtmdet.training.epoch_end import EpochEndMixin
from rtmdet.training.steps import StepMixin

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainingError", "train"]


def train(data: DataParams, model: ModelParams, train: TrainParams, out_dir: Path, *,
          dataset: DetectionDataset | None = None, live_dir: Path | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume, or return at once when finished) the run of these params into out_dir.

    Writes out_dir/last.pt (EMA weights + resume state) and out_dir/best.pt (EMA weights of the
    best validation mAP), and dvclive logs into live_dir. Under torchrun every rank calls this.
    """
    check_train_params(train)
    info = dist_utils.setup(train.device)
    try:
        return _Run(data, model, train, Path(out_dir), dataset, live_dir, info, progress).run()
    finally:
        dist_utils.cleanup(info)


class _Run(StepMixin, EpochEndMixin):
    """One training run's objects; `run()` drives the epochs."""

    def __init__(self, data: DataParams, model: ModelParams, train: TrainParams, out_dir: Path,
                 dataset: DetectionDataset | None, live_dir: Path | None, info: dist_utils.DistInfo,
                 progress: bool):
        self.data_p, self.model_p, self.p = data, model, train
        self.out_dir, self.live_dir, self.info, self.progress = out_dir, live_dir, info, progress
        self.device = info.device
        self.task = train_task(model.task)
        parts = self.task.parts  # the task family's data, model, validation, checkpoints (training.task_parts)
        self.dataset = dataset if dataset is not None else parts.read_dataset(data, self.task.masks)
        if self.task.masks and self.dataset.splits["train"].records[0].segmentations is None:
            raise ConfigError(f"model.task {model.task}: the dataset of {data.root} was read without its instance "
                              "masks (load_dataset(..., masks=True))")
        self.params = st.params_dict(data, model, train)
        self.payload = st.fingerprint_payload(data, model, train, info.world_size, parts.digest(self.dataset))
        self.fp = st.fingerprint(self.payload)
        self.last_path, self.best_path = out_dir / "last.pt", out_dir / "best.pt"
        self.total_batch = train.batch_size * info.world_size
        self.epoch, self.batch, self.global_iter = 0, 0, 0
        self.best_map: float | None = None
        self.best_epoch: int | None = None
        self.last_metrics: dict[str, Any] = {}
        self.meter_state: dict[str, float] | None = None
        self.images_seen, self.train_seconds = 0, 0.0
        self.phase = Phases(self.device)  # off: benchmarks/train_profile.py turns it on
        self.lr_now = 0.0  # the lr of the latest step (the schedule's, set by _step)
        self._init_epoch_end()

    # ---- setup -------------------------------------------------------------------------------
    def _build(self, resume: dict[str, Any] | None) -> None:
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.p.cudnn_benchmark  # train.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._build_model(resume)
        self._build_data()
        self._build_step()
        if self.info.is_main:
            p = self.p
            log.info("lr %.3g = train.lr %.3g x total batch %d (%d per rank x %d) / base_batch_size %d; "
                     "%d iterations per epoch, AMP %s", self.lr, p.lr, self.total_batch, p.batch_size,
                     self.info.world_size, p.base_batch_size, self.iters_per_epoch, self.amp or "off")

    def _build_model(self, resume: dict[str, Any] | None) -> None:
        p, info = self.p, self.info
        # A resumed run takes its weights from last.pt: model.init need not be there any more.
        params = self.model_p if resume is None else replace(self.model_p, init=None)
        net = self.task.parts.build_model(params, len(self.dataset.classes), p.seed).to(self.device)
        if p.channels_last:
            net.to(memory_format=torch.channels_last)
        self.ema = ExpMomentumEMA(net, p.ema_momentum, p.ema_gamma) if p.ema else None
        sync_bn = sync_bn_enabled(p.sync_bn, p.batch_size, info.world_size, self.device)
        if sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # keeps the same parameter tensors
        self.net = net
        self.distiller = self._build_distiller(net)
        self.distilling = self.distiller is not None
        self.trained = net if self.distiller is None else torch.nn.ModuleList([net, self.distiller.adapters])
        self.lr = scaled_lr(p, self.total_batch)
        self.optimizer = build_optimizer(self.trained, self.lr, p.weight_decay, self.device)
        self.amp = amp_dtype(p.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.compiled = compile_enabled(p.compile, self.device)
        self.graph_blocker = self._graph_blocker(sync_bn)
        self.graphed = self.compiled and p.compile_mode in GRAPH_MODES and self.graph_blocker is None
        if resume is not None:
            self._restore(resume)
        else:
            seed_everything(p.seed + info.rank)  # per-rank streams; the data pipeline has its own seeds
        self.ddp = None
        if info.distributed and self.graphed:
            # The step graphs all-reduce the gradients themselves (no DDP reducer in a capture):
            # start every rank from rank 0's weights, as DDP would.
            dist_utils.broadcast_module(self.trained, info)
        elif info.distributed:
            # Only rank 0's BN statistics are ever saved (EMA) or validated, and training-mode BN
            # never reads them: nothing to broadcast each step, with or without SyncBN.
            # (torch > 2.11 renames broadcast_buffers and warns; the old name works in both.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.ddp = DistributedDataParallel(
                    net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    broadcast_buffers=False, gradient_as_bucket_view=True)
        self.eager = self.ddp or net

    def _build_distiller(self, net: torch.nn.Module) -> Distiller | None:
        """train.teacher: the frozen teacher on this device, hooks on both necks, fresh adapters."""
        if not self.p.teacher:
            return None
        if not self.task.parts.distills:
            raise ConfigError(f"train.teacher: distillation is for detectors; model.task {self.model_p.task} "
                              "trains without a teacher (set train.teacher: null)")
        teacher = load_teacher(self.p.teacher, self.dataset.classes).to(self.device)
        if self.p.channels_last:
            teacher.to(memory_format=torch.channels_last)
        if self.info.is_main:
            log.info("distilling from %s (RTMDet-%s, %s classes) into the neck, weight %g, tau %g%s", self.p.teacher,
                     teacher.cfg.size, teacher.cfg.num_classes,
                     self.p.distill_weight, self.p.distill_tau, "" if self.p.distill_stage2 else "; not in stage 2")
        torch.manual_seed(self.p.seed)  # the same adapters on every rank and every resume
        return Distiller(teacher, net, self.p.distill_weight, self.p.distill_tau).to(self.device)

    def _build_data(self) -> None:
        p, s = self.p, self.model_p.imgsz
        parts, info = self.task.parts, self.info
        self.criterion = self.task.loss(self.net, p)  # model.task's (training.tasks)
        self.priors = None
        if parts.uses_priors:
            self.priors = make_priors([(s // k, s // k) for k in self.net.strides], self.net.strides,
                                      device=self.device)
        train_ds, collate_fn = parts.train_data(self.dataset, self.model_p, p)
        self.loader = build_dataloader(train_ds, p.batch_size, num_workers=p.workers, seed=p.seed,
                                       rank=info.rank, world_size=info.world_size, collate_fn=collate_fn)
        # Every rank validates its share of the split; the results go to rank 0 over a host group.
        group = dist_utils.host_group(info)
        self.validator = parts.validator(self.dataset, s, self.device, min(2 * p.batch_size, 64), min(p.workers, 4),
                                         self.task.masks, info.rank, info.world_size, group)
        sampler = self.loader.batch_sampler
        assert isinstance(sampler, TrainBatchSampler)
        self.iters_per_epoch = sampler.batches_per_epoch()
        self.schedule = LrSchedule.from_params(p, self.lr, self.iters_per_epoch)
        self.window = torch.zeros(p.log_interval, len(LossMeter.NAMES), device=self.device)  # per-iteration losses

    def _restore(self, ckpt: dict[str, Any]) -> None:
        ts = ckpt["train_state"]
        self.net.load_state_dict(ts["model"])
        self.optimizer.load_state_dict(ts["optimizer"])
        if self.scaler is not None and ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["state_dict"])
            self.ema.load_state_dict(ts["ema"])
        if self.distiller is not None and ts.get("distill_adapters"):
            self.distiller.adapters.load_state_dict(ts["distill_adapters"])
        self.epoch, self.batch, self.global_iter = ts["epoch"], ts["batch"], ts["global_iter"]
        self.best_map, self.best_epoch = ts["best_map"], ts["best_epoch"]
        self.meter_state = ts["meters"] if self.batch > 0 else None
        self.images_seen, self.train_seconds = ts.get("images_seen", 0), ts.get("train_seconds", 0.0)
        st.restore_rng(ts["rng"])
        if self.info.rank != 0:  # per-rank streams: offset rank 0's saved state deterministically
            seed_everything(self.p.seed + self.info.rank + self.global_iter)

    # ---- driving ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        resume = st.read_resume(self.last_path, self.fp, self.payload)
        if resume is not None and resume["train_state"].get("finished"):
            if self.info.is_main:
                log.info("%s: this run already finished (%d epochs); nothing to do", self.last_path, self.p.epochs)
            return self._result_from(resume, already_finished=True)
        dist_utils.barrier(self.info)  # every rank has read last.pt before rank 0 may remove it
        if resume is None and self.info.is_main:
            st.discard_stale(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.info.is_main and (n := remove_stale_temporaries(self.out_dir)):
            log.info("%s: removed %d half-written files of a killed run", self.out_dir, n)
        started = time.perf_counter()
        self._build(resume)
        setup = time.perf_counter() - started
        if resume is not None and self.info.is_main:
            log.info("resuming %s at epoch %d, batch %d of %d (iteration %d)", self.last_path, self.epoch + 1,
                     self.batch, self.iters_per_epoch, self.global_iter)
        self.live = LiveLogger(self.live_dir if self.info.is_main else None, resume=resume is not None)
        # Every remaining epoch in one pass of the loader: its workers prefetch across epoch ends.
        set_epochs(self.loader, self.epoch, self.p.epochs, self.p.epochs - self.p.stage2_epochs, skip=self.batch)
        self.batches = iter(self.loader)
        self.first_epoch, self.loader_started = self.epoch, time.perf_counter()
        try:
            first = self.epoch
            for epoch in range(first, self.p.epochs):
                self._train_epoch(epoch)
                self._end_epoch(epoch)
            self._wait_checkpoints()
            if self.info.is_main and self.p.epochs > first:
                c, total = self.clock, time.perf_counter() - started
                log.info("finished in %.1f s: setup %.1f s, epochs %.1f s, between epochs %.1f s (validation %.1f s in "
                         "the way, %d runs, their scoring, %.1f s, beside training; checkpoints %.1f s; waiting for "
                         "other ranks %.1f s), the rest %.1f s", total, setup, self.train_seconds, c["epoch ends"],
                         c["validation"], self.val_runs, c["scoring"], c["checkpoints"], c["ranks"],
                         total - setup - self.train_seconds - c["epoch ends"])
        finally:
            self.live.close()
            self.close()
        return self._result(resumed=resume is not None)

    def close(self) -> None:
        """Stop the loaders' workers now, not at exit (where torch waits seconds per worker), and
        free the step graphs before the process group ends."""
        self.loader.close()
        if self.validator is not None:
            self.validator.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close(quiet=True)  # after a failure too: the last good checkpoints still reach the disk
        if self.graphs is not None:
            self.graphs.close()

    def _stage(self, epoch: int) -> int:
        return 2 if epoch >= self.p.epochs - self.p.stage2_epochs else 1

    def _train_epoch(self, epoch: int) -> None:
        skip = self.batch  # non-zero only for the epoch a mid-epoch checkpoint resumes
        # The batch order is a pure function of (seed, epoch): the loader left out the first
        # `skip` batches, exactly the rest of an interrupted epoch, without decoding them.
        self.distilling = self.distiller is not None and (self._stage(epoch) == 1 or self.p.distill_stage2)
        self.net.train()
        self.meter = LossMeter(self.meter_state if skip else None)
        self.pending = 0
        n = self.iters_per_epoch
        self.bar = tqdm(total=n, initial=skip, desc=f"epoch {epoch + 1}/{self.p.epochs}", unit="it",
                        disable=not (self.progress and self.info.is_main), dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        with self.bar:
            for k in range(skip, n):
                with self.phase("data"):
                    batch = next(self.batches)
                if k == skip and epoch == self.first_epoch and self.info.is_main:
                    log.info("first batch %.1f s after the loader started", time.perf_counter() - self.loader_started)
                self._step(batch)
                if armed("train:step"):
                    self.writer.wait()
                kill_point("train:step")
                self.global_iter += 1
                self.pending += 1
                if self.pending == self.p.log_interval or k == n - 1:
                    with self.phase("host sync"):
                        self._sync(epoch, k)
        self.epoch_seconds = time.perf_counter() - start
        self.train_seconds += self.epoch_seconds
        self.epoch_images = (n - skip) * self.total_batch
        self.images_seen += self.epoch_images

    def _sync(self, epoch: int, k: int) -> None:
        """Host sync point: read the loss window, stop on NaN/inf, update the bar, maybe checkpoint."""
        rows = self.window[: self.pending].tolist()
        first_bad = next((i for i, r in enumerate(rows) if not all(math.isfinite(v) for v in r)), None)
        if dist_utils.any_rank(self.info, first_bad is not None):
            self._nonfinite(epoch, k, rows, first_bad)
        self.meter.add(rows)
        if not self.bar.disable:
            last = dict(zip(LossMeter.NAMES, self.meter.last))
            parts = "".join(f" {k} {last['loss_' + k]:.4f}" for k in self.task.loss_parts)
            self.bar.set_postfix_str(f"loss {last['loss']:.4f}{parts} lr {self.lr_now:.3g}{self._mem()}",
                                     refresh=False)
        self.bar.update(self.pending)
        self.pending = 0
        due = time.monotonic() - self.last_ckpt >= self.p.ckpt_interval_s
        if k < self.iters_per_epoch - 1 and due and self.info.is_main:
            self._save_last(epoch, k + 1, finished=False)

    def _nonfinite(self, epoch: int, k: int, rows: list[list[float]], first_bad: int | None) -> None:
        if first_bad is None:
            raise TrainingError(f"epoch {epoch + 1}: the loss became NaN/inf on another rank before iteration "
                                f"{self.global_iter}; kept {self.last_path} and {self.best_path} from before")
        batch = k - len(rows) + 1 + first_bad
        loss, cls, box = rows[first_bad][:3]
        raise TrainingError(
            f"epoch {epoch + 1}, iteration {batch + 1}/{self.iters_per_epoch} "
            f"(global {self.global_iter - len(rows) + first_bad}): "
            f"non-finite loss {loss} (loss_cls {cls}, loss_bbox {box}); stopped, keeping the last good "
            f"{self.last_path.name} and {self.best_path.name} (try a lower train.lr, train.grad_clip, or amp: off)")

    def _result(self, resumed: bool) -> TrainResult:
        return TrainResult(self.out_dir, self.last_path, self.best_path if self.best_path.exists() else None,
                           self.p.epochs, self.best_map, self.best_epoch, self.last_metrics, resumed, False,
                           self.train_seconds, self.images_seen / self.train_seconds if self.train_seconds else None)

    def _result_from(self, ckpt: dict[str, Any], already_finished: bool) -> TrainResult:
        ts = ckpt["train_state"]
        secs = float(ts.get("train_seconds", 0.0))
        return TrainResult(self.out_dir, self.last_path, self.best_path if self.best_path.exists() else None,
                           self.p.epochs, ts.get("best_map"), ts.get("best_epoch"), ts.get("last_metrics") or {},
                           True, already_finished, secs, ts.get("images_seen", 0) / secs if secs else None)
