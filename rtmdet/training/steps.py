"""How one training step runs: eager, with the model compiled, or whole as CUDA graphs.

`StepMixin` is the step half of the trainer's `_Run` (rtmdet.training.trainer), split out to keep
each module small. It uses the run's objects that `_Run._build_model` and `_build_data` make:
task, net, eager (the DDP wrapper or net), trained, optimizer, scaler, ema, criterion, priors,
distiller, amp, compiled, graphed, graph_blocker, phase, p (TrainParams), info and device.
`_build_step` picks the kind of step; `_step` runs one on a batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rtmdet.errors import first_line
from rtmdet.training import distributed as dist_utils
from rtmdet.training.build import GRAPH_MODES, compile_model
from rtmdet.training.logs import LossMeter
from rtmdet.training.optim import set_lr
from rtmdet.training.step_graph import StepGraphs

log = logging.getLogger(__name__)


class StepMixin:
    """The training step of a `_Run` (see the module docstring for the attributes it uses)."""

    def _graph_blocker(self, sync_bn: bool) -> str | None:
        """Why the step cannot be a CUDA graph here (None: it can)."""
        if self.device.type != "cuda":
            return "it needs a CUDA GPU"
        if self.scaler is not None:
            return "fp16 needs a gradient scaler, which syncs with the host"
        if sync_bn:
            return "SyncBatchNorm (train.sync_bn) is not captured"
        return self.task.graph_blocker

    def _build_step(self) -> None:
        """How a step runs, by train.compile and train.compile_mode: the whole step as CUDA graphs
        (graph modes on CUDA GPUs, one or several, bf16 or fp32, no SyncBN), or the model's forward
        compiled (other modes; its input shape never changes, so it compiles once),
        or all eager."""
        self.model_fn, self.graphs, mode = self.eager, None, self.p.compile_mode
        self.criterion.phase = self.phase
        self.first_step = True
        if not self.compiled:
            return
        if self.graphed:
            agree = dist_utils.HostMax(self.info) if self.info.distributed else None
            self.graphs = StepGraphs(self._graph_body, self.optimizer, self.device, agree=agree)
            self.criterion.phase = self.phase.off  # never a synchronizing timer inside a capture
        elif mode in GRAPH_MODES:
            # A step that cannot be graphed trains eagerly: compiling the model alone did not pay.
            # RTMDet-Ins-tiny, animals_seg at 320, 100 epochs, one H200 (benchmarks/peer_yolo.py
            # --task segment): inductor 339 s (98 s of it compiling in epoch 1), eager 212 s;
            # torch.compile's cudagraphs backend 162 s, but its one run scored 0.287 mask mAP
            # against 0.335-0.361 for the others, unexplained, so it is not the default.
            if self.info.is_main:
                log.info("train.compile_mode %s: %s; training eagerly", mode, self.graph_blocker)
            self.compiled = False
            return
        self.model_fn = compile_model(self.eager, mode)

    def _loss_sums(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The task loss's un-normalized sums for a batch (targets: the task's entries, on the device)."""
        x = self.net.normalize(images)
        if self.p.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        graphed = self.graphs is not None
        # A capture keeps no autocast cache (its casts must be part of the graph).
        with (self.phase.off if graphed else self.phase)("forward"), torch.autocast(
                self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                cache_enabled=not graphed):
            outputs = self.model_fn(x)
            distill = self.distiller.loss(x) if self.distilling else None
        sums = self.criterion.step_sums(outputs, targets, priors=self.priors)
        if distill is not None:
            sums["loss_distill"] = distill
        return sums

    def _losses(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The task's normalized losses plus the distillation loss (already weighted); every name
        of LossMeter.NAMES is there (0 where a run has no such part)."""
        losses = self.criterion.normalize(sums)  # DDP: all-reduces the average factor
        losses.setdefault("loss_mask", torch.zeros_like(losses["loss"]))
        distill = sums.get("loss_distill")
        losses["loss_distill"] = distill if distill is not None else torch.zeros_like(losses["loss"])
        losses["loss"] = losses["loss"] + losses["loss_distill"]
        return losses

    def _step(self, batch: dict[str, Any]) -> None:
        """One training step on a batch at the schedule's lr for self.global_iter."""
        self.lr_now = self.schedule(self.global_iter)
        if self.graphs is not None:
            losses = self._graphed_step(batch)
        else:
            losses = self._eager_step(batch)
        self.window[self.pending] = torch.stack([losses[k] for k in LossMeter.NAMES]).detach()

    def _eager_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        set_lr(self.optimizer, self.lr_now)
        dev = self.device
        with self.phase("h2d"):
            images = batch["images"].to(dev, non_blocking=True)
            targets = {k: batch[k].to(dev, non_blocking=True) for k in self.task.targets}
        if self.first_step and self.compiled:
            losses = self._first_compiled_step(images, targets)
        else:
            losses = self._forward_backward(images, targets)
        with self.phase("optimizer"):
            if self.p.grad_clip:
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.p.grad_clip)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.phase("ema"):
            if self.ema is not None:
                self.ema.update(self.net)
        return losses

    def _graphed_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The step as a CUDA graph replay (after warm-up steps and a capture per box bucket). If
        the first capture fails, one warning line and the rest of training runs eagerly."""
        weight = self.ema.next_weight() if self.ema is not None else 0.0
        try:
            with self.phase("step (graph)"):
                losses = self.graphs(batch["images"], batch["boxes"], batch["labels"], self.lr_now, weight,
                                     variant=self.distilling)
        except Exception as exc:  # noqa: BLE001 - a capture that fails means: train eagerly
            if self.graphs.captures:
                raise  # it worked before: a real error, not the compiler's
            log.warning("CUDA graph capture failed (%s); training without it (train.compile: false skips it)",
                        first_line(exc, 200))
            self.graphs.release_lr()
            self.graphs, self.model_fn, self.compiled = None, self.eager, False
            self.criterion.phase = self.phase
            self.optimizer.zero_grad(set_to_none=True)
            return self._eager_step(batch)
        if self.ema is not None:
            self.ema.steps += 1
        return losses

    def _graph_body(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    ema_weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """One whole step on device tensors with no host sync: what StepGraphs captures."""
        self.optimizer.zero_grad(set_to_none=False)  # the graphs accumulate into persistent grads
        losses = self._losses(self._loss_sums(images, {"boxes": boxes, "labels": labels}))
        losses["loss"].backward()
        if self.info.distributed:
            dist_utils.average_gradients(self.trained, self.info)  # NCCL, captured with the rest
        if self.p.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.p.grad_clip, foreach=True)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.apply(self.net, ema_weight)
        return {k: losses[k].detach() for k in LossMeter.NAMES}

    def _forward_backward(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict:
        losses = self._losses(self._loss_sums(images, targets))
        with self.phase("backward"):
            (self.scaler.scale(losses["loss"]) if self.scaler else losses["loss"]).backward()
        if self.info.distributed and self.ddp is None:  # a graphed run's eager steps
            dist_utils.average_gradients(self.trained, self.info)
        elif self.distilling and self.info.distributed:
            dist_utils.average_gradients(self.distiller.adapters, self.info)  # not inside DDP
        return losses

    def _first_compiled_step(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict:
        """torch.compile fails, if it does, at the first forward or backward: then train eagerly."""
        self.first_step = False
        try:
            return self._forward_backward(images, targets)
        except Exception as exc:  # noqa: BLE001 - any compiler or backend failure means: train eagerly
            log.warning("torch.compile failed (%s); training without it (train.compile: false skips it)",
                        first_line(exc, 200))
            self.compiled, self.model_fn = False, self.eager
            self.optimizer.zero_grad(set_to_none=True)
            return self._forward_backward(images, targets)
