"""Checkpoints of a training run: assembly, the run fingerprint, RNG states and resume decisions.

last.pt and best.pt are mmdetection-layout checkpoints: `state_dict` holds the EMA weights
(what is shipped and evaluated), `meta` the model config, classes and params. last.pt also
holds `train_state`, everything a killed run needs to continue exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.data.records import DetectionDataset
from rtmdet.errors import CheckpointError, RTMDetError
from rtmdet.models.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

STATE_VERSION = 1


class TrainingError(RTMDetError):
    """Training cannot go on (a NaN or infinite loss); the last good checkpoints are kept."""

# Train keys that change neither the data seen nor the update rule: changing one resumes the run.
# (device/compile/channels_last/cudnn_benchmark only change float rounding, like another GPU.)
NOT_IN_FINGERPRINT = frozenset({
    "workers", "device", "compile", "compile_mode", "gpus", "channels_last", "cudnn_benchmark", "val_interval",
    "stage2_val_interval", "ckpt_interval_s", "log_interval",
})


@dataclass
class TrainResult:
    """What a run produced: checkpoints, the best validation mAP and the last validation's metrics."""

    out_dir: Path
    last: Path
    best: Path | None
    epochs: int
    best_mAP: float | None = None
    best_epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # last validation (EvalResult.to_metrics())
    resumed: bool = False
    already_finished: bool = False
    seconds: float = 0.0
    images_per_s: float | None = None


def params_dict(data: DataParams, model: ModelParams, train: TrainParams) -> dict[str, dict[str, Any]]:
    """The three sections as plain dicts (checkpoint meta['params'])."""
    return {"data": asdict(data), "model": asdict(model), "train": asdict(train)}


def dataset_digest(dataset: DetectionDataset) -> str:
    """A hash of the classes and the training targets (file names, boxes, labels), not the pixels."""
    h = hashlib.sha256()
    h.update(json.dumps([list(dataset.classes), [int(c) for c in dataset.category_ids]]).encode())
    for rec in dataset.splits["train"].records:
        h.update(rec.file.name.encode())
        h.update(np.ascontiguousarray(rec.boxes, np.float32).tobytes())
        h.update(np.ascontiguousarray(rec.labels, np.int64).tobytes())
        if rec.segmentations is not None:  # the segment task trains on the masks too
            h.update(json.dumps(rec.segmentations, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def fingerprint_payload(data: DataParams, model: ModelParams, train: TrainParams, world_size: int,
                        digest: str) -> dict[str, Any]:
    """What defines a run: params (minus NOT_IN_FINGERPRINT), the number of ranks, the data."""
    params = params_dict(data, model, train)
    params["train"] = {k: v for k, v in params["train"].items() if k not in NOT_IN_FINGERPRINT}
    if params["model"].get("task") == "detect":  # the task before there was a choice: runs from then resume
        params["model"] = {k: v for k, v in params["model"].items() if k != "task"}
    return {**params, "world_size": world_size, "dataset": digest}  # digest: the task's (dataset_digest for boxes)


def fingerprint(payload: dict[str, Any]) -> str:
    """A short stable hash of a fingerprint payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def describe_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Which fingerprint entries differ, e.g. 'train.epochs 300 -> 150, dataset changed'."""
    if not isinstance(old, dict):
        return "the checkpoint holds no fingerprint details"
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{key}.{k} {a.get(k)!r} -> {b.get(k)!r}"
                        for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            changes.append("dataset changed" if key == "dataset" else f"{key} {a!r} -> {b!r}")
    return ", ".join(changes) or "unknown difference"


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as tensors/lists (weights_only-loadable)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [name, torch.from_numpy(np_keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generator states captured by capture_rng."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def make_checkpoint(base: dict[str, Any], params: dict[str, Any], *, epoch: int, iteration: int,
                    mAP: float | None, train_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint of the weights in `base` (the task's checkpoint of the EMA model, e.g. mmdetection's
    layout) with the run's meta; train_state only in last.pt. mAP: the best validation score."""
    base["meta"].update({"params": params, "epoch": epoch, "iter": iteration, "mAP": mAP})
    if train_state is not None:
        base["train_state"] = train_state
    return base


def read_resume(path: Path, fp: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """last.pt's checkpoint when it continues this run (same fingerprint), else None.

    A last.pt of another run (params or data changed) or an unreadable one is logged and set
    aside, never mixed into this run.
    """
    if not path.is_file():
        return None
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        log.warning("%s; starting a new run", exc)
        return None
    state = ckpt.get("train_state")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        log.warning("%s: holds no resumable training state; starting a new run", path)
        return None
    if state.get("fingerprint") != fp:
        log.warning("%s: belongs to another run (%s); starting a new run from scratch", path,
                    describe_change(state.get("fingerprint_payload"), payload))
        return None
    return ckpt


def discard_stale(out_dir: Path, names: tuple[str, ...] = ("last.pt", "best.pt")) -> None:
    """Remove the checkpoints of a previous, different run so they are never taken for this one's."""
    for name in names:
        path = out_dir / name
        if path.exists():
            path.unlink()
            log.info("removed %s of the previous run", path)
