"""Where a training step spends its time, for benchmarks/train_profile.py.

The trainer wraps each part of a step in `phase(name)`. Off (the default) that is a
`nullcontext`, which costs nothing and which torch.compile traces through. On, every phase
first waits for the GPU, so each one's wall time is its own work (data wait, host-to-device
copy, forward, assigner, losses, backward, optimizer, EMA, host syncs, validation parts), and
each is also a `torch.profiler.record_function` range in a trace.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator

import torch


class Phases:
    """A phase timer: `with phases("forward"): ...`; `totals` holds seconds and counts per name."""

    def __init__(self, device: torch.device | None = None, enabled: bool = False):
        self.device = device
        self.enabled = enabled
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def __call__(self, name: str) -> AbstractContextManager:
        return self._timed(name) if self.enabled else nullcontext()

    @staticmethod
    def off(name: str) -> AbstractContextManager:
        """Never timed: for code that may run inside a CUDA graph capture (no syncs allowed)."""
        return nullcontext()

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
            self._sync()
        total = self.totals[name]
        total[0] += time.perf_counter() - start
        total[1] += 1

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.totals.clear()
