"""Typed sections of params.yaml, validated with errors that name the key.

Every stage reads its own section plus `data` and `model` through `load_params`. An unknown or
mistyped key is an error naming it (with the closest valid key), so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rtmdet.errors import ConfigError


@dataclass
class DataParams:
    """Where the dataset is; the default is the embedded synthetic dataset the `synthetic` stage makes."""

    root: str = "data/synthetic"
    # Explicit layout (mmdetection / SSCMA ann_file + img_prefix), relative to root; leave null for
    # the Roboflow layout (root/train, root/valid, optional root/test).
    train_ann_file: str | None = None
    train_img_prefix: str | None = None
    val_ann_file: str | None = None
    val_img_prefix: str | None = None
    test_ann_file: str | None = None
    test_img_prefix: str | None = None
    num_classes: int | None = None  # optional check against the classes found in the data
    synthetic_seed: int = 0  # the embedded default dataset (used when root is data/synthetic)
    synthetic_train: int = 400
    synthetic_valid: int = 100

    def split_files(self) -> dict[str, tuple[str, str]] | None:
        """The explicit layout as {split: (ann_file, img_dir)}, or None for the Roboflow layout."""
        pairs = {"train": (self.train_ann_file, self.train_img_prefix),
                 "valid": (self.val_ann_file, self.val_img_prefix),
                 "test": (self.test_ann_file, self.test_img_prefix)}
        if all(a is None and i is None for a, i in pairs.values()):
            return None
        for name, (ann, img) in pairs.items():
            if (ann is None) != (img is None):
                raise ConfigError(f"params: data.{name if name != 'valid' else 'val'}_ann_file and its img_prefix "
                                  "must be given together")
        if pairs["train"][0] is None or pairs["valid"][0] is None:
            raise ConfigError("params: the explicit layout needs data.train_ann_file and data.val_ann_file")
        return {name: pair for name, pair in pairs.items() if pair[0] is not None}


@dataclass
class ModelParams:
    """Which RTMDet to build; null keeps the size's default."""

    size: str = "nano"
    imgsz: int = 192
    task: str = "detect"  # detect (boxes) or segment (RTMDet-Ins: boxes and instance masks)
    act: str | None = None
    channel_attention: bool | None = None
    normalization: str | None = None
    init: str | None = None  # null: from scratch; or a CSPNeXt backbone / full detector checkpoint


@dataclass
class TrainParams:
    """The RTMDet recipe (mmdetection's values, lr scaled linearly with the batch)."""

    epochs: int = 300
    batch_size: int = 32
    lr: float = 0.004  # at base_batch_size; the run uses lr * batch_size / base_batch_size
    base_batch_size: int = 256
    weight_decay: float = 0.05
    warmup_iters: int = 1000
    cosine_start: float = 0.5  # fraction of epochs after which lr follows a cosine to min_lr_ratio
    min_lr_ratio: float = 0.05
    stage2_epochs: int = 20  # last epochs without mosaic/mixup (>= epochs: no mosaic/mixup at all)
    resize_range: list[float] | None = None  # RandomResize ratio range of both stages (null: the size's, 0.5-2.0 or 0.1-2.0)
    assigner_topk: int = 13  # DynamicSoftLabelAssigner's candidate count per box (mmdetection: 13)
    ema: bool = True
    ema_momentum: float = 0.0002
    ema_gamma: float = 2000.0
    amp: str = "auto"  # auto (bf16 where supported, else fp16 with a scaler), bf16, fp16, off
    grad_clip: float | None = None
    channels_last: bool = True
    cudnn_benchmark: bool = False  # cuDNN autotuning: 25 s at the first step on an H200, steps ~3% faster after
    compile: bool | str = "auto"  # auto: on for CUDA GPUs, off on the CPU
    teacher: str | None = None  # distillation: a detector checkpoint, or a size trained first (runs/teacher)
    teacher_epochs: int | None = None  # a size's teacher trains this long (null: train.epochs)
    distill_weight: float = 1.0  # per neck level, channel-wise divergence of normalized features
    distill_tau: float = 1.0
    distill_stage2: bool = False  # keep distilling in the stage-2 epochs (MMRazor: the student trains alone)
    compile_mode: str = "graph"  # graph (the whole step as CUDA graphs), graph-inductor, cudagraphs, default, ...
    sync_bn: bool | str = "auto"  # several GPUs: auto = SyncBatchNorm when a GPU has under 16 images
    gpus: int | str = "auto"  # ranks the train stage starts: auto = every visible GPU (1 on a CPU machine)
    workers: int = 4
    val_interval: int = 10
    stage2_val_interval: int = 1  # validation interval in the stage-2 epochs (mmdet: every epoch)
    ckpt_interval_s: float = 300.0  # write last.pt at least this often (mid-epoch too): a kill loses at most this much
    log_interval: int = 10  # iterations between host syncs (progress bar, NaN check, mid-epoch checkpoint)
    seed: int = 0
    device: str = "auto"


@dataclass
class EvaluateParams:
    """Scoring the best checkpoint on valid (and test when the dataset has one)."""

    splits: list[str] | None = None  # null: valid and test (when present)
    conf_thr: float = 0.3  # score threshold of the confusion matrix and the image grid
    grid_images: int = 16
    batch_size: int = 8
    device: str = "auto"


@dataclass
class ExportParams:
    """The `export` stage: models/best.pt to ONNX and TFLite float32 / float16 / int8."""

    formats: list[str] | None = None  # null: onnx, tflite_fp32, tflite_fp16, tflite_int8
    calib_images: int = 100  # int8 calibration images, drawn from the train split
    int8_io: str = "float"  # int8 file input/output: float, or int8 / uint8 for raw-pixel device input
    seed: int = 0  # which calibration images are drawn


@dataclass
class QATParams:
    """The `qat` stage: fine-tune the float model with simulated int8, then export int8 TFLite."""

    epochs: int = 5  # fine-tuning epochs with fake-quant, stage-2 (no mosaic) pipeline
    lr: float = 0.0002  # AdamW lr at train.base_batch_size, scaled like train.lr; cosine to train.min_lr_ratio
    batch_size: int = 16
    # Activation ranges are recalibrated (min/max over the export's calibration images, as TF's
    # converter computes them) before each epoch up to this one (0-based), then stay fixed.
    # BatchNorm is folded into the convs before QAT, as TFLite runs it: there is none to freeze.
    freeze_observers_epoch: int = 3
    # Classifiers: fine-tune toward the float model's own softmax on each batch (knowledge
    # distillation) instead of the labels.
    distill: bool = True
    # Detectors (detect, segment, rotate): weight of the pull toward the float model's own raw
    # outputs on each batch (rtmdet.quantization.self_distill), added to the task's loss; 0: labels only.
    distill_weight: float = 0.0
    # Keep an exponential moving average of the fine-tuned weights (each step's weights enter it
    # with this weight) and export that; 0 exports the last step's weights. auto: 0.01 for segment
    # models (measured: RTMDet-Ins-tiny's int8 mask mAP 0.3590 with it, 0.3508 without, PTQ
    # 0.3567), 0 for the other tasks (their QAT beats PTQ without it).
    ema: float | str = "auto"
    workers: int = 2
    seed: int = 0
    device: str = "auto"


@dataclass
class VerifyParams:
    """The `verify` stage: every exported model scored on valid by the same evaluator."""

    max_drop: float = 0.02  # fail when a format's mAP is this far below torch float (int8 formats: int8_max_drop)
    int8_max_drop: float = 0.05  # the same for tflite_int8 and qat_int8
    split: str = "valid"
    threads: int = 2  # CPU threads for latency and scoring
    latency_images: int = 50  # images timed per format (median latency per image)
    batch_size: int = 8  # torch batch size for scoring


@dataclass
class ReportParams:
    """The `report` stage: reports/README.md and reports/experiments.md."""

    metric: str = "auto"  # the metric experiments are ranked and charted by (auto: mAP, a classifier's top1)


SECTIONS: dict[str, type] = {"data": DataParams, "model": ModelParams, "train": TrainParams,
                             "evaluate": EvaluateParams, "export": ExportParams, "qat": QATParams,
                             "verify": VerifyParams, "report": ReportParams}


def _check_type(section: str, key: str, value: Any, annotation: Any) -> Any:
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if typing.get_origin(t) is list and isinstance(value, list):
            item = typing.get_args(t)[0]
            if item is str and all(isinstance(v, str) for v in value):
                return value
            if item is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return [float(v) for v in value]
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    names = " or ".join("null" if t is type(None) else str(t) if typing.get_origin(t) else t.__name__ for t in allowed)
    hint = ""
    if isinstance(value, bool) and bool not in allowed:  # YAML 1.1 reads unquoted off/no/on/yes as booleans
        hint = f" (YAML reads an unquoted {'off, no' if not value else 'on, yes'} or {str(value).lower()} as a " \
               f"boolean: quote the word, e.g. {key}: '{'off' if not value else 'on'}')"
    raise ConfigError(f"params: {section}.{key} must be {names}, got {value!r}{hint}")


def parse_section(section: str, raw: dict[str, Any] | None) -> Any:
    """One section dict -> its dataclass; unknown keys and wrong types name the key."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: section '{section}' must be a mapping of keys to values")
    values = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else f"; valid keys: {', '.join(hints)}"
            raise ConfigError(f"params: unknown key '{section}.{key}'{hint}")
        values[key] = _check_type(section, key, value, hints[key])
    return cls(**values)


def load_params(path: str | Path = "params.yaml", sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read params.yaml; returns {section: dataclass} for the requested (default: all) sections."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    for name in raw:
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown section '{name}'{hint}")
    wanted = sections or tuple(SECTIONS)
    return {name: parse_section(name, raw.get(name)) for name in wanted}


def as_dict(obj: Any) -> dict[str, Any]:
    """A params dataclass as a plain dict (for checkpoint meta and reports)."""
    return dataclasses.asdict(obj)
