"""What a training run is built from: the dataset, the model and its initialization, AMP, compile."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from torch import nn

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.data.records import DetectionDataset
from rtmdet.errors import ConfigError, DataError
from rtmdet.models import RTMDet, build_model

log = logging.getLogger(__name__)


def dataset_from_params(data: DataParams, masks: bool = False) -> DetectionDataset:
    """Read the dataset `data` points at: Roboflow/COCO layout under root, or explicit ann files;
    with each box's instance mask when `masks` (the segment task)."""
    from rtmdet.data.coco import load_dataset

    dataset = load_dataset(data.root, splits=data.split_files(), masks=masks)
    if data.num_classes is not None and data.num_classes != len(dataset.classes):
        raise ConfigError(f"data.num_classes is {data.num_classes} but {data.root} has {len(dataset.classes)} "
                          f"classes ({', '.join(dataset.classes)})")
    if "train" not in dataset.splits or not dataset.splits["train"].records:
        raise DataError(f"{data.root}: no training images (the train split is missing or empty)")
    return dataset


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_train_model(params: ModelParams, num_classes: int, seed: int) -> RTMDet:
    """The model of `params` initialized from scratch (seeded) or from params.init."""
    torch.manual_seed(seed)  # the same initial weights on every rank and on every resume
    model = build_model(params.size, num_classes, params.act, channel_attention=params.channel_attention,
                        normalization=params.normalization, image_size=params.imgsz, task=params.task)
    if params.init:
        from rtmdet.models.checkpoint import load_checkpoint

        load_checkpoint(model, params.init)
        log.info("initialized from %s", params.init)
    return model


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: auto = bf16 where the GPU supports it, else fp16; None on CPU or 'off'."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError(f"train.amp {amp!r}: use auto, bf16, fp16 or off")
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.amp bf16: this GPU does not support bfloat16; use auto or fp16")
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


# "graph": the whole step (forward, assigner, losses, backward, AdamW, EMA) as CUDA graphs, eager
# kernels (rtmdet.training.step_graph); "graph-inductor": the same with the model's kernels fused
# by inductor inside. The others compile the model alone: inductor's modes by name, or
# "cudagraphs" (torch.compile's CUDA-graph backend for the model's forward and backward).
GRAPH_MODES = ("graph", "graph-inductor")
COMPILE_MODES = (*GRAPH_MODES, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                 "cudagraphs")


def compile_model(module: nn.Module, mode: str):
    """torch.compile of the model alone for train.compile_mode (a graph mode's model part: inductor's
    default mode for "graph-inductor", none for "graph")."""
    if mode == "graph":
        return module
    if mode == "graph-inductor":
        mode = "default"  # CUDA graphs come from the step graph around it
    if mode == "cudagraphs":
        return torch.compile(module, backend="cudagraphs")
    return torch.compile(module, mode=None if mode == "default" else mode)


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """train.compile: auto = on for CUDA GPUs (a launch-bound step gains most), off on the CPU
    (compiling takes longer than a short CPU run saves)."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"train.compile {setting!r}: use auto, true or false")


def sync_bn_enabled(setting: bool | str, batch_size: int, world_size: int, device: torch.device) -> bool:
    """train.sync_bn: BatchNorm statistics over every rank's images (SyncBatchNorm) or each rank's
    own. auto = SyncBN only when a rank has under 16 images, where its own statistics get noisy;
    it costs two collectives per BN layer and step, and needs CUDA."""
    if setting not in ("auto", True, False):
        raise ConfigError(f"train.sync_bn {setting!r}: use auto, true or false")
    if world_size == 1:
        return False
    if device.type != "cuda":
        if setting is True:
            log.warning("train.sync_bn: SyncBatchNorm needs CUDA; on CPU each rank uses its own batch statistics")
        return False
    return batch_size < 16 if setting == "auto" else setting


def check_train_params(train: TrainParams) -> None:
    """Reject values the loop cannot run with, naming the key."""
    positive = {"epochs": train.epochs, "batch_size": train.batch_size, "base_batch_size": train.base_batch_size,
                "log_interval": train.log_interval}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {value}")
    if train.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {train.lr}")
    if train.stage2_epochs < 0:  # >= epochs means every epoch uses the stage-2 pipeline
        raise ConfigError(f"train.stage2_epochs must be 0 or more, got {train.stage2_epochs}")
    if not 0.0 <= train.cosine_start <= 1.0:
        raise ConfigError(f"train.cosine_start is a fraction of the epochs (0..1), got {train.cosine_start}")
    if train.grad_clip is not None and train.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip must be positive or null, got {train.grad_clip}")
    if train.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode {train.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
    if train.ckpt_interval_s < 0:
        raise ConfigError(f"train.ckpt_interval_s must not be negative, got {train.ckpt_interval_s}")
