"""What happens between epochs: validation scored in the background, the epoch's report, checkpoints.

`EpochEndMixin` is the epoch-end half of the trainer's `_Run` (rtmdet.training.trainer), split out
to keep each module small. It uses the run's objects: p (TrainParams), task, info, device, net, ema,
optimizer, scaler, distiller, meter, validator, live, dataset, params, paths and counters.

Validation in two parts: the GPU part (the model and the post-process over the valid split) runs
at the epoch's end; the COCO scoring, CPU work as long as the inference or longer, runs in a
process of its own (rtmdet.evaluation.score_process) while the next epoch trains. That epoch's report (its log line, its dvclive row, best.pt
when its mAP is the best so far) follows when the score is in: at the next epoch's end, or before
last.pt is written, so last.pt never misses a validation (a killed run resumes to the same bytes).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from rtmdet.failpoints import armed, kill_point
from rtmdet.training import distributed as dist_utils
from rtmdet.training import state as st
from rtmdet.training.ckpt_writer import CheckpointWriter, host_copy
from rtmdet.training.optim import optimizer_state, validation_due

log = logging.getLogger(__name__)

WRITE_SHARE = 10  # epoch-end writes of last.pt take at most ~1/10 of the training time


@dataclass
class EpochReport:
    """One finished epoch, waiting for its validation score (if it has one) to be reported."""

    epoch: int  # 0-based
    metrics: dict[str, float | None]  # dvclive's row: train/*, and val/* once scored
    means: dict[str, float]
    seconds: float
    images: int
    lr: float
    score: Future | None = None  # the background COCO scoring of this epoch's weights
    best: dict[str, Any] | None = None  # those weights as best.pt, written if they score best
    inference_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class EpochEndMixin:
    """The epoch end of a `_Run` (see the module docstring for the attributes it uses)."""

    def _init_epoch_end(self) -> None:
        # Seconds outside the steps: epoch ends in all, and in them validation, scoring (in its own
        # process), checkpoints and waiting for the other ranks.
        self.clock = {"epoch ends": 0.0, "validation": 0.0, "scoring": 0.0, "checkpoints": 0.0, "ranks": 0.0}
        self.val_runs, self.val_last = 0, ""
        self.unreported: list[EpochReport] = []
        self.last_ckpt, self.last_write_s = time.monotonic(), 0.0  # when last.pt was last written, how long it took
        self.writer = CheckpointWriter()  # checkpoints go to disk beside training (ckpt_writer.py)
        self.best_saved = False

    def _validate(self) -> dict[str, Any]:
        """A whole validation, now (benchmarks/train_profile.py)."""
        with self.phase("validate"):
            return self.validator(self._weights())

    def _end_epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        self._epoch_end(epoch)
        self.clock["epoch ends"] += time.perf_counter() - start

    def _epoch_end(self, epoch: int) -> None:
        start = time.perf_counter()
        if self.graphs is not None and not dist_utils.same_on_every_rank(list(self.trained.parameters()), self.info):
            # Graphed ranks average their gradients inside the graphs (no DDP to keep them equal).
            raise st.TrainingError(f"epoch {epoch + 1}: the ranks' weights differ (their gradient all-reduce did "
                                   f"not hold); train.compile: false trains with DDP instead")
        self.clock["ranks"] += time.perf_counter() - start
        means = self.meter.means()
        absent = {"loss_distill": self.distiller is None, "loss_mask": "mask" not in self.task.loss_parts,
                  "loss_bbox": "bbox" not in self.task.loss_parts}
        metrics: dict[str, float | None] = {f"train/{k}": v for k, v in means.items() if not absent.get(k)}
        metrics["train/lr"] = self.lr_now
        report = EpochReport(epoch, metrics, means, self.epoch_seconds, self.epoch_images, self.lr_now)
        if self.info.is_main:
            self._flush_reports()  # the previous epoch's score: it had this whole epoch to finish
        if self.validator is not None and validation_due(self.p, epoch):
            self._submit_validation(report)  # every rank infers its share; rank 0 scores
        if self.info.is_main:
            self.unreported.append(report)
            finished = epoch + 1 == self.p.epochs
            if report.score is None:
                self._flush_reports()
            if finished or self._epoch_write_due():
                # No validation split: ship the final weights (best.pt may be queued, or on disk from
                # before a resume).
                if finished and not (self.best_saved or self.best_path.exists()):
                    self._save_best(self._best_checkpoint(epoch))
                self._save_last(epoch + 1, 0, finished=finished)
            if armed("train:epoch"):
                self.writer.wait()  # the kill comes after the checkpoint is on disk
            kill_point("train:epoch")
        self.batch = 0
        start = time.perf_counter()
        dist_utils.barrier(self.info)
        self.clock["ranks"] += time.perf_counter() - start

    def _submit_validation(self, report: EpochReport) -> None:
        start = time.perf_counter()
        with self.phase("validate"):
            if self.info.is_main:
                report.best = self._best_checkpoint(report.epoch)  # a copy: training goes on changing the weights
            # The other ranks validate rank 0's weights: their BN statistics (and EMA of them) are their own.
            dist_utils.broadcast_module(self._weights(), self.info)
            report.score = self.validator.submit(self._weights())
        report.inference_s = time.perf_counter() - start
        report.extra = dict(self.validator.seconds)
        self.clock["validation"] += report.inference_s
        self.val_runs += 1

    def _flush_reports(self) -> None:
        """Report every finished epoch in order, waiting for a pending score."""
        while self.unreported:
            report = self.unreported.pop(0)
            val = None
            if report.score is not None:
                start = time.perf_counter()
                val = self.validator.collect(report.score)
                wait = time.perf_counter() - start
                self.clock["validation"] += wait
                self.clock["scoring"] += self.validator.seconds["scoring"]
                sec = report.extra
                self.val_last = (f"{report.inference_s + wait:.2f}s: model {sec['model']:.2f}, post-process "
                                 f"{sec['postprocess']:.2f}, wait {wait:.2f}; scoring "
                                 f"{self.validator.seconds['scoring']:.2f} beside training")
                self.last_metrics = val
                for name in self.task.val_metrics:  # mAP, mAP50 (and the segment task's mask ones), top1, top5
                    report.metrics[f"val/{name}"] = val[name]
                score = val[self.task.best_metric] or 0.0  # mAP, the segment task's mask mAP, top1
                if self.best_map is None or score > self.best_map:
                    self.best_map, self.best_epoch = score, report.epoch + 1
                    self._save_best(report.best)
            self.live.log_epoch(report.epoch, report.metrics)
            self._log_summary(report, val)

    def _log_summary(self, report: EpochReport, val: dict[str, Any] | None) -> None:
        done = report.epoch + 1
        rate = report.images / max(report.seconds, 1e-9)
        eta = (self.p.epochs - done) * report.seconds
        score = ""
        if val is not None:
            numbers = " ".join(f"{name.replace('_', ' ')} {val[name] or 0:.4f}" for name in self.task.val_metrics
                               if val[name] is not None or name.startswith(("mAP", "mask")))  # top5: None under 5 classes
            score = f"  {numbers} (best {self.best_map:.4f} @ {self.best_epoch}; validation {self.val_last})"
        means = report.means
        parts = ", ".join(f"{k} {means['loss_' + k]:.4f}" for k in self.task.loss_parts)
        log.info("epoch %d/%d  loss %.4f%s  lr %.3g  %.1f img/s  %.1fs %s%s  ETA %s",
                 done, self.p.epochs, means["loss"], f" ({parts})" if parts else "",
                 report.lr, rate, report.seconds, self._mem(), score, time.strftime("%H:%M:%S", time.gmtime(eta)))

    def _mem(self) -> str:
        """Peak GPU memory reserved by this process (what the allocator took from the driver)."""
        if self.device.type != "cuda":
            return ""
        return f" mem {torch.cuda.max_memory_reserved(self.device) / 2**30:.1f}G"

    # ---- checkpoints --------------------------------------------------------------------------
    def _weights(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.net

    def _best_checkpoint(self, epoch: int) -> dict[str, Any]:
        """best.pt's content for the weights as they are now (tensors copied off the model)."""
        ckpt = st.make_checkpoint(self.task.parts.checkpoint(self._weights(), self.dataset), self.params,
                                  epoch=epoch + 1, iteration=self.global_iter, mAP=None)
        ckpt["state_dict"] = {k: v.clone() for k, v in ckpt["state_dict"].items()}  # .cpu() of a CPU tensor is itself
        return ckpt

    def _save_best(self, ckpt: dict[str, Any]) -> None:
        """ckpt: _best_checkpoint's (its tensors already copies on the host)."""
        start = time.perf_counter()
        ckpt["meta"]["mAP"] = self.best_map
        self.writer.write(ckpt, self.best_path)
        self.best_saved = True
        self.clock["checkpoints"] += time.perf_counter() - start

    def _wait_checkpoints(self) -> None:
        """Every checkpoint written (the end of training: the run's result names the files)."""
        start = time.perf_counter()
        self.writer.wait()
        self.clock["checkpoints"] += time.perf_counter() - start

    def _epoch_write_due(self) -> bool:
        """last.pt at an epoch's end: every epoch, unless epochs are so short that writing it each
        time would take over 1/WRITE_SHARE of the run (0.3 s epochs, 0.3 s writes on an H200); then
        once WRITE_SHARE times the last write's duration has passed (or train.ckpt_interval_s, if
        shorter). A kill loses at most that much."""
        since = time.monotonic() - self.last_ckpt
        return since >= min(self.p.ckpt_interval_s, WRITE_SHARE * self.last_write_s)

    def _save_last(self, epoch: int, batch: int, finished: bool) -> None:
        """last.pt at `batch` batches into epoch `epoch` (0-based): where a resumed run continues."""
        self._flush_reports()  # last.pt holds the outcome of every validation before it
        start = time.perf_counter()
        ts = {
            "version": st.STATE_VERSION, "fingerprint": self.fp, "fingerprint_payload": self.payload,
            "finished": finished, "epoch": epoch, "batch": batch, "global_iter": self.global_iter,
            "best_map": self.best_map, "best_epoch": self.best_epoch,
            "model": self.net.state_dict(), "optimizer": optimizer_state(self.optimizer),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None, "rng": st.capture_rng(),
            "distill_adapters": self.distiller.adapters.state_dict() if self.distiller else None,
            "meters": self.meter.state_dict(), "images_seen": self.images_seen,
            "train_seconds": self.train_seconds, "world_size": self.info.world_size, "lr": self.lr,
            "last_metrics": self.last_metrics,
        }
        ckpt = st.make_checkpoint(self.task.parts.checkpoint(self._weights(), self.dataset), self.params,
                                  epoch=epoch, iteration=self.global_iter, mAP=self.best_map, train_state=ts)
        self.writer.write(host_copy(ckpt), self.last_path)
        spent = time.perf_counter() - start
        # What a write costs the run: the snapshot here, or the background write if that is longer
        # (it competes for the host's cores and disk).
        self.last_write_s = max(spent, self.writer.seconds.get(self.last_path, 0.0))
        self.clock["checkpoints"] += spent
        self.last_ckpt = time.monotonic()
