"""Checkpoints written beside training: the trainer snapshots a checkpoint to host memory (its
tensors copied, so training may go on changing the weights) and a background thread pickles and
writes it (save_atomic: a temporary file, fsync, rename).

Writing last.pt and best.pt took 4-10 s of a 50-125 s two-GPU run on an H200 (12 validations),
with the GPUs idle. Snapshots wait per file: a newer snapshot of a path replaces one not yet
written (last.pt at epoch 7 makes last.pt at epoch 6 pointless), so memory stays bounded and a
slow disk never queues up work. A kill loses at most the write in flight: the file it replaces
is still whole. A failed write (disk full) is raised on the training thread at the next
checkpoint or at `wait()`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from rtmdet.models.checkpoint import save_atomic

log = logging.getLogger(__name__)


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to the CPU (CPU tensors cloned: training changes them in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if obj.device.type == "cpu" else obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [host_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """One background thread writing the newest snapshot of each path."""

    def __init__(self) -> None:
        self._pending: dict[Path, Any] = {}
        self._busy: Path | None = None
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.seconds: dict[Path, float] = {}  # how long the last write of each path took
        self._thread = threading.Thread(target=self._loop, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def write(self, obj: Any, path: str | Path) -> None:
        """Queue `obj` (tensors already on the host: host_copy) for `path`; returns at once."""
        self._raise()
        with self._cond:
            self._pending[Path(path)] = obj
            self._cond.notify_all()

    def wait(self) -> None:
        """Block until every queued snapshot is on disk; raise a failed write's error."""
        with self._cond:
            self._cond.wait_for(lambda: (not self._pending and self._busy is None) or self._error is not None)
        self._raise()

    def close(self, quiet: bool = False) -> None:
        """Write what is queued, then stop the thread. quiet: log a failed write instead of raising
        it (closing after another error, which must not be masked)."""
        try:
            self.wait()
        except Exception as exc:
            if not quiet:
                raise
            log.error("a checkpoint write failed: %s", exc)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                path = next(iter(self._pending))
                obj = self._pending.pop(path)
                self._busy = path
            start = time.perf_counter()
            try:
                save_atomic(obj, path)
            except BaseException as exc:  # handed to the training thread
                with self._cond:
                    self._error = exc
            finally:
                del obj
                with self._cond:
                    self.seconds[path] = time.perf_counter() - start
                    self._busy = None
                    self._cond.notify_all()
