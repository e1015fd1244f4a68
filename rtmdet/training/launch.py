"""Several GPUs without leaving DVC: `train.gpus` ranks started by torch's elastic launcher.

`train_on_gpus` is what the train stage and `rtmdet train` call. With train.gpus auto (every
visible GPU) or N > 1 it starts the ranks itself through `torch.distributed.launcher.api`, the
code behind `torchrun`, on this machine; each rank runs `rtmdet.training.train`, which joins the
group from the launcher's environment. Under a launcher already (torchrun, several nodes: see
the README) it trains as the rank it was started as.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.data.records import DetectionDataset
from rtmdet.errors import ConfigError
from rtmdet.training.state import TrainResult
from rtmdet.training.trainer import TrainingError, train as train_run

log = logging.getLogger(__name__)


def launched() -> bool:
    """True inside a rank that torchrun (or this module) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_gpus(setting: int | str, device: str) -> int:
    """How many ranks to start: auto = every visible CUDA GPU (1 when there is none or
    train.device is cpu); an explicit count must exist on this machine. Counted through NVML,
    which leaves this process free to fork the ranks (rank_start_method)."""
    visible = torch.cuda.device_count()
    if setting == "auto":
        return max(visible, 1) if device in ("auto", "cuda") else 1
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"train.gpus {setting!r}: use auto or a number of GPUs (1 or more)")
    if setting > 1 and device == "cpu":
        raise ConfigError(f"train.gpus {setting}: train.device is cpu; set train.gpus: 1 (or auto) to train on the CPU")
    if setting > 1 and setting > visible:
        have = f"only {visible} CUDA GPU{'s' if visible != 1 else ''} visible" if visible else "no CUDA GPU"
        raise ConfigError(f"train.gpus {setting}: this machine has {have}; use train.gpus: auto")
    return setting


def rank_start_method() -> str:
    """spawn (fresh interpreters), unless RTMDET_RANK_START=fork asks for forked ranks, which
    start in 0.3 s instead of ~2.5 s each on the CPU. Not the default: a forked rank
    segfaulted at its first tensor op inside the full test suite's process (TensorFlow and
    OpenMP thread pools loaded before the fork), and forks are unmeasured on GPUs. A fork is
    refused (spawn, with a warning) once this process has asked the CUDA runtime anything."""
    chosen = os.environ.get("RTMDET_RANK_START", "spawn")
    if chosen not in ("spawn", "fork"):
        raise ConfigError(f"RTMDET_RANK_START={chosen!r}: use spawn or fork")
    if chosen == "fork" and (not sys.platform.startswith("linux") or torch.cuda.is_initialized()
                             or _fork_poisoned()):
        log.warning("RTMDET_RANK_START=fork: this process has used CUDA (or is not on Linux); spawning the ranks")
        return "spawn"
    return chosen


def _fork_poisoned() -> bool:
    """Whether a child forked now would find CUDA unusable: torch marks forks bad once the CUDA
    runtime was asked anything (cudaGetDeviceCount included), which torch.cuda.is_initialized
    does not show. Asked of a child that exits at once."""
    pid = os.fork()
    if pid == 0:
        os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) != 0


def train_on_gpus(data: DataParams, model: ModelParams, train: TrainParams, out_dir: Path, *,
                  dataset: DetectionDataset | None = None, live_dir: Path | None = None,
                  progress: bool = True) -> TrainResult:
    """Train in this process, or start train.gpus ranks on this machine and return rank 0's result."""
    ranks = 1 if launched() else resolve_gpus(train.gpus, train.device)
    if ranks == 1:
        return train_run(data, model, train, out_dir, dataset=dataset, live_dir=live_dir, progress=progress)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    method = rank_start_method()
    log.info("starting %d ranks, one per GPU (train.gpus %s; %s)", ranks, train.gpus, method)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=f"rtmdet-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=1.0,
                          start_method=method)
    start = time.time()
    try:
        results = elastic_launch(config, _rank)(data, model, train, Path(out_dir), dataset, live_dir, progress)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        reason = (failure.message or f"exit code {failure.exitcode}").strip().splitlines()[-1][:300]
        raise TrainingError(f"rank {rank} of {ranks} failed: {reason}") from None
    result, entered, left = results[0]
    # What several GPUs cost beside training: starting the ranks (processes, imports) and ending
    # them (the rank's teardown, the launcher noticing).
    log.info("ranks: %.1f s to start, %.1f s in rank 0's training, %.1f s to end", entered - start, left - entered,
             time.time() - left)
    return result


def train_with_teacher(data: DataParams, model: ModelParams, train: TrainParams, out_dir: Path, teacher_dir: Path,
                       *, dataset: DetectionDataset | None = None, live_dir: Path | None = None,
                       progress: bool = True) -> tuple[TrainResult, TrainResult | None]:
    """train.teacher a model size: train that teacher first into teacher_dir (same data, recipe
    and image size; train.teacher_epochs long; resumable like any run), then the student
    distilled from its best weights. A checkpoint path is used as it is; null trains alone.
    Returns (student, teacher or None)."""
    from rtmdet.models import SIZES

    teacher = None
    if train.teacher and not Path(train.teacher).is_file():
        if train.teacher not in SIZES:
            raise ConfigError(f"train.teacher {train.teacher}: no such checkpoint file, and not a model size "
                              f"({', '.join(SIZES)}) to train one")
        t_model = ModelParams(size=train.teacher, imgsz=model.imgsz)
        t_train = replace(train, teacher=None, epochs=train.teacher_epochs or train.epochs)
        log.info("training the teacher, RTMDet-%s at %d px for %d epochs, into %s", train.teacher, model.imgsz,
                 t_train.epochs, teacher_dir)
        teacher = train_on_gpus(data, t_model, t_train, teacher_dir, dataset=dataset, progress=progress)
        train = replace(train, teacher=str(teacher.best or teacher.last))
    student = train_on_gpus(data, model, train, out_dir, dataset=dataset, live_dir=live_dir, progress=progress)
    return student, teacher


@record
def _rank(data: DataParams, model: ModelParams, train: TrainParams, out_dir: Path,
          dataset: DetectionDataset | None, live_dir: Path | None,
          progress: bool) -> tuple[TrainResult, float, float]:
    """One rank: logging as the parent had it (rank 0 talks, the others warn), then train. Returns
    the result and when training began and ended (time.time())."""
    entered = time.time()
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if root.handlers:  # forked: the parent's handlers, at this rank's level
        root.setLevel(min(root.level, level) if rank == 0 else level)
    else:  # spawned: a fresh interpreter
        logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    result = train_run(data, model, train, out_dir, dataset=dataset, live_dir=live_dir, progress=progress and rank == 0)
    return result, entered, time.time()
