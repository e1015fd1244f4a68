"""The whole training step as CUDA graphs: one launch per step instead of about 2,000.

A step of a small detector is launch-bound: the GPU finishes each of the ~2,000 small kernels of
forward, assigner, losses, backward, AdamW and EMA before Python has launched the next. Captured
once as a CUDA graph and replayed, the step costs what its kernels cost.

What a graph needs, and how the trainer provides it:

* static shapes: the images never change shape; the number of boxes per image does, so boxes
  and labels are padded to a bucket (8, 16, 32, ... boxes) and each bucket gets its own graph
  (padding has label -1, which the assigner ignores: the same assignment, bit for bit);
* no host sync inside: the assigner and losses have none (tests/test_compile.py);
* values that change per step live in device tensors the graph reads: the learning rate
  (AdamW's tensor lr) and the EMA weight, filled before each replay;
* persistent gradients: zeroed inside the step (not set to None) so every graph accumulates
  into the same tensors;
* a few eager warm-up steps per bucket on a side stream (cuDNN autotuning, lazy state) before
  capturing; those are real training steps, not discarded work.

Several ranks (one process per GPU): the body all-reduces the gradients itself (NCCL, captured
in the graph like any kernel; no DDP reducer, whose bucketing runs on the host), so every rank
must replay the same graphs in the same order: `agree` makes the ranks pick one bucket per step
(the largest any rank needs, through a CPU group), and warm-up and capture happen on every rank at
the same step.

All graphs share one memory pool: they are replayed one at a time on one stream, and every
graph's outputs stay referenced, so one graph's scratch memory can be another's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from rtmdet.errors import first_line

log = logging.getLogger(__name__)

StepBody = Callable[[Tensor, Tensor, Tensor, Tensor], dict[str, Tensor]]


def box_bucket(num_boxes: int) -> int:
    """The padded box count of a batch whose images hold up to num_boxes: a power of two >= 8."""
    return 8 if num_boxes <= 8 else 1 << (num_boxes - 1).bit_length()


@dataclass
class _Graph:
    images: Tensor
    boxes: Tensor
    labels: Tensor
    warm_steps: int = 0
    warm_seconds: float = 0.0  # host time spent in its eager warm-up steps
    failed: bool = False  # its capture failed: eager steps
    graph: torch.cuda.CUDAGraph | None = None
    outputs: dict[str, Tensor] = field(default_factory=dict)


class StepGraphs:
    """Runs `body(images, boxes, labels, ema_weight)` (one whole training step, no host sync) as
    CUDA graphs, one per box bucket, after `warmup` eager steps each.

    The optimizer's param groups get one shared device tensor as lr; `__call__` fills it with
    the step's lr. `captures` counts the graphs built."""

    def __init__(self, body: StepBody, optimizer: torch.optim.Optimizer, device: torch.device, warmup: int = 2,
                 agree: Callable[[int], int] | None = None):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.body, self.optimizer, self.device, self.warmup = body, optimizer, device, warmup
        self.agree = agree  # several ranks: every rank's bucket -> the one they all use (HostMax)
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr  # AdamW reads a tensor lr on the device: the graph sees each new value
        self.ema_weight = torch.zeros((), device=device)
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream(device)
        self.captures = 0
        self.eager_steps = 0  # warm-up (and failed-capture) steps run eagerly

    def release_lr(self) -> None:
        """Give the optimizer python-float lrs again (leaving graph mode)."""
        value = float(self.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def close(self) -> None:
        """Free the graphs (before the process group ends: their captured all-reduces hold its
        NCCL communicator)."""
        torch.cuda.synchronize(self.device)
        for slot in self.graphs.values():
            if slot.graph is not None:
                slot.graph.reset()
        self.graphs.clear()

    def _slot(self, images: Tensor, boxes: Tensor, variant: object) -> _Graph:
        bucket = box_bucket(boxes.shape[1])
        if self.agree is not None:
            bucket = self.agree(bucket)
        key = (tuple(images.shape), images.dtype, bucket, variant)
        slot = self.graphs.get(key)
        if slot is None:
            n = images.shape[0]
            slot = _Graph(torch.empty(images.shape, dtype=images.dtype, device=self.device),
                          torch.full((n, bucket, 4), -1.0, device=self.device),
                          torch.full((n, bucket), -1, dtype=torch.long, device=self.device))
            self.graphs[key] = slot
        return slot

    def __call__(self, images: Tensor, boxes: Tensor, labels: Tensor, lr: float, ema_weight: float,
                 variant: object = None) -> dict[str, Tensor]:
        """One training step on this batch (host or device tensors); returns the body's outputs.
        `variant` names what else the body's work depends on (its graphs are kept apart)."""
        slot = self._slot(images, boxes, variant)
        m = boxes.shape[1]
        slot.images.copy_(images, non_blocking=True)
        slot.boxes[:, :m].copy_(boxes, non_blocking=True)
        slot.labels[:, :m].copy_(labels, non_blocking=True)
        if m < slot.labels.shape[1]:  # the tail is padding, whatever an earlier batch left there
            slot.boxes[:, m:].fill_(-1.0)
            slot.labels[:, m:].fill_(-1)
        self.lr.fill_(lr)
        self.ema_weight.fill_(ema_weight)
        if slot.graph is None:
            if slot.failed or slot.warm_steps < self.warmup:
                slot.warm_steps += 1
                return self._eager(slot)
            self._capture(slot)
            if slot.failed:
                return self._eager(slot)
        slot.graph.replay()
        return slot.outputs

    def _eager(self, slot: _Graph) -> dict[str, Tensor]:
        """A warm-up step: the body run eagerly on a side stream, as capture will see it."""
        start = time.perf_counter()
        self.eager_steps += 1
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            out = self.body(slot.images, slot.boxes, slot.labels, self.ema_weight)
        main.wait_stream(self.side)
        slot.warm_seconds += time.perf_counter() - start
        return out

    def _capture(self, slot: _Graph) -> None:
        """Capture the body for this slot's bucket. thread_local: the data loader's pin-memory
        thread keeps allocating pinned buffers meanwhile, which a global capture would forbid.
        A failed capture leaves the bucket eager, with one warning line."""
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                slot.outputs = self.body(slot.images, slot.boxes, slot.labels, self.ema_weight)
        except Exception as exc:  # noqa: BLE001 - any capture failure: this bucket stays eager
            slot.failed = True
            log.warning("CUDA graph capture failed for batches of up to %d boxes per image (%s); those steps "
                        "run eagerly", slot.labels.shape[1], first_line(exc, 200))
            return
        slot.graph = graph
        self.captures += 1
        log.info("captured the training step as CUDA graph %d (up to %d boxes per image) in %.1f s, after %d eager "
                 "warm-up steps (%.1f s on the host)", self.captures, slot.labels.shape[1], time.perf_counter() - start,
                 slot.warm_steps, slot.warm_seconds)
