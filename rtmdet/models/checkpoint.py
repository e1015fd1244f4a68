"""Checkpoint reading, writing and loading into a model (mmdetection layout).

A checkpoint is a dict with `state_dict` (mmdetection's keys; EMA weights for training runs)
and `meta`. rtmdet adds `meta['rtmdet']` (the ModelConfig) and `meta['dataset_meta']`
(`classes`, as mmdetection writes them, plus `category_ids`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtmdet.errors import CheckpointError, first_line
from rtmdet.fileio import write_atomic
from rtmdet.models import safe_pickle
from rtmdet.models.classifier import ClassifierConfig, CSPNeXtClassifier
from rtmdet.models.detector import SIZES, ModelConfig, RTMDet, model_config

log = logging.getLogger(__name__)

_NOT_WEIGHTS = ("data_preprocessor.",)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load a checkpoint safely; one-line CheckpointError for any unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:  # torch would only say "Ran out of input"
        raise CheckpointError(f"{path}: not a readable checkpoint (empty file, 0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable checkpoint ({_unreadable_reason(path, exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, expected a dict of weights)")
    return obj


def _unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why torch.load failed, in one short clause (torch's messages run to several sentences)."""
    if path.suffix in (".onnx", ".tflite"):
        return (f"an exported {path.suffix} model, not a torch checkpoint: exports run through "
                "rtmdet.export.detector_from_export")
    return f"truncated, corrupt or not a torch file: {first_line(exc, 1000).split('. ')[0].rstrip('.')[:120]}"


def extract_state_dict(ckpt: dict[str, Any], path: str | Path = "") -> dict[str, torch.Tensor]:
    """The weights of a checkpoint: `state_dict` (or `model`, or the dict itself), prefixes removed."""
    sd = ckpt
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: checkpoint holds no weight tensors")
    if all(k.startswith("module.") for k in tensors):  # DDP-wrapped
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    # mmdet 2.x YOLOX-style hooks stored EMA copies as `ema_*` keys beside the weights.
    return {k: v for k, v in tensors.items() if not k.startswith(_NOT_WEIGHTS) and not k.startswith("ema_")}


def config_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "") -> ModelConfig:
    """The ModelConfig stored by rtmdet, or one inferred from an mmdetection checkpoint's weights."""
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if isinstance(meta.get("rtmdet"), dict):
        return ModelConfig.from_dict(meta["rtmdet"])
    return infer_config(extract_state_dict(ckpt, path), path)


def infer_config(sd: dict[str, torch.Tensor], path: str | Path = "") -> ModelConfig:
    """Recognize the size of an mmdetection RTMDet state dict by its shapes."""
    if "backbone.stem.2.conv.weight" not in sd or "bbox_head.rtm_cls.0.weight" not in sd:
        examples = ", ".join(list(sd)[:3])
        raise CheckpointError(
            f"{path}: not an RTMDet detector checkpoint: none of its {len(sd)} keys is an RTMDet backbone "
            f"stem or class predictor (e.g. {examples})")
    stem = sd["backbone.stem.2.conv.weight"].shape[0]
    attention = any(".attention.fc." in k for k in sd)
    num_classes = sd["bbox_head.rtm_cls.0.weight"].shape[0]
    for size, cfg in SIZES.items():
        if int(64 * cfg.widen) == stem and cfg.channel_attention == attention:
            blocks = sum(k.startswith("backbone.stage2.1.blocks.") and k.endswith("conv1.conv.weight") for k in sd)
            if blocks == max(round(6 * cfg.deepen), 1):
                task = ("segment" if "bbox_head.rtm_kernel.0.weight" in sd
                        else "rotate" if "bbox_head.rtm_ang.0.weight" in sd else "detect")
                return model_config(size, num_classes, task=task)
    raise CheckpointError(f"{path}: RTMDet weights of an unknown size (stem width {stem}, attention {attention})")


def load_checkpoint(model: RTMDet, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load a detector or backbone-only checkpoint into `model`; returns the checkpoint dict.

    A different class count re-initializes only the class predictors (logged). Anything else
    that does not fit raises a CheckpointError counting missing/unexpected keys.
    """
    ckpt = read_checkpoint(path)
    sd = extract_state_dict(ckpt, path)
    if not any(k.startswith(("neck.", "bbox_head.")) for k in sd):
        _load_backbone(model, sd, path)
        return ckpt
    sd, reinitialized = _drop_class_predictors_if_needed(model, sd, path)
    _check_keys(model, sd, path, strict, allow_missing=set(reinitialized))
    model.load_state_dict(sd, strict=False)
    return ckpt


def _drop_class_predictors_if_needed(model: RTMDet, sd: dict, path: str | Path) -> tuple[dict, list[str]]:
    own = model.state_dict()
    cls_keys = [k for k in sd if k.startswith("bbox_head.rtm_cls.")]
    if cls_keys and all(k in own and own[k].shape != sd[k].shape for k in cls_keys):
        theirs = sd[cls_keys[0]].shape[0]
        log.warning(
            "%s: checkpoint has %d classes, model has %d: loaded everything else and re-initialized "
            "the class predictors (%s)", path, theirs, model.cfg.num_classes, ", ".join(cls_keys))
        model.bbox_head.reset_cls_predictors()
        return {k: v for k, v in sd.items() if k not in cls_keys}, cls_keys
    return sd, []


def _check_keys(model: nn.Module, sd: dict, path: str | Path, strict: bool, allow_missing: set[str] = frozenset()) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in allow_missing]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: weights do not fit this {model.cfg.size} model: {len(missing)} missing keys "
            f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected keys "
            f"(e.g. {', '.join(unexpected[:3]) or '-'})")
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f"{path}: {len(mismatched)} weights have the wrong shape for this {model.cfg.size} model "
            f"(e.g. {k}: checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})")


def _load_backbone(model: RTMDet, sd: dict, path: str | Path) -> None:
    """CSPNeXt ImageNet weights: keys with or without a `backbone.` prefix; classifier keys ignored."""
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k: v for k, v in sd.items() if k.startswith(("stem.", "stage"))}
    if not sd:
        raise CheckpointError(f"{path}: holds neither detector nor CSPNeXt backbone weights")
    own = model.backbone.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path}: backbone weights do not fit the {model.cfg.size} backbone: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} with another shape "
            f"(e.g. {', '.join((missing + unexpected + mismatched)[:3])})")
    model.backbone.load_state_dict(sd)
    log.info("%s: loaded CSPNeXt backbone weights (%d tensors); neck and head stay initialized", path, len(sd))


def checkpoint_dict(model: RTMDet, classes: list[str], category_ids: list[int] | None = None,
                    extra_meta: dict | None = None, **extra: Any) -> dict[str, Any]:
    """A checkpoint in mmdetection's layout, carrying what rebuilds the model and its classes."""
    meta = {"rtmdet": model.cfg.to_dict(),
            "dataset_meta": {"classes": list(classes), "category_ids": list(category_ids or range(len(classes)))}}
    meta.update(extra_meta or {})
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state_dict": sd, "meta": meta, **extra}


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename: never a half-written file."""
    write_atomic(Path(path), lambda f: torch.save(obj, f))


def load_model(path: str | Path, device: str | torch.device = "cpu",
               tasks: tuple[str, ...] = ("detect",)) -> tuple[RTMDet, dict[str, Any]]:
    """Build the model a checkpoint describes, load its weights, eval mode; returns (model, ckpt).
    `tasks`: the model tasks the caller handles (a checkpoint of another is one clear error)."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, path, tasks).to(device), ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "",
                          tasks: tuple[str, ...] = ("detect",)) -> RTMDet:
    """The RTMDet a read checkpoint describes, weights loaded strictly, eval mode (see load_model)."""
    if is_classifier_checkpoint(ckpt):
        raise CheckpointError(f"{path}: a CSPNeXt classifier checkpoint (task classify), not a detector; "
                              "load it with rtmdet.models.checkpoint.load_classifier")
    cfg = config_from_checkpoint(ckpt, path)
    if cfg.task not in tasks:
        what = "box detection" if tasks == ("detect",) else " and ".join(tasks)
        raise CheckpointError(f"{path}: an RTMDet {cfg.task} model; this step handles {what} only so far "
                              f"(build it with build_model({cfg.size!r}, {cfg.num_classes}, task={cfg.task!r}) "
                              "and load its state_dict)")
    model = RTMDet(cfg)
    sd = extract_state_dict(ckpt, path)
    _check_keys(model, sd, path, strict=True)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def checkpoint_task(path: str | Path) -> str:
    """The task of the model a checkpoint holds: detect, segment, rotate or classify."""
    ckpt = read_checkpoint(path)
    return CLASSIFY if is_classifier_checkpoint(ckpt) else config_from_checkpoint(ckpt, path).task


def class_names_of(ckpt: dict[str, Any], num_classes: int) -> list[str]:
    """Class names from meta['dataset_meta']['classes'] (mmdetection's place), else class_<i>."""
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    ds = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    classes = ds.get("classes") or meta.get("classes")
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return [f"class_{i}" for i in range(num_classes)]


CLASSIFY = "classify"


def is_classifier_checkpoint(ckpt: dict[str, Any]) -> bool:
    """True for a checkpoint written by save_classifier_checkpoint (meta task "classify")."""
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    return meta.get("task") == CLASSIFY


def classifier_checkpoint_dict(model: CSPNeXtClassifier, classes: list[str]) -> dict[str, Any]:
    """A classifier checkpoint: state_dict (mmpretrain's keys) + meta (task, ClassifierConfig, classes)."""
    if len(classes) != model.cfg.num_classes:
        raise CheckpointError(f"{len(classes)} class names given for a classifier with {model.cfg.num_classes} classes")
    meta = {"task": CLASSIFY, "classifier": model.cfg.to_dict(), "dataset_meta": {"classes": [str(c) for c in classes]}}
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}


def save_classifier_checkpoint(model: CSPNeXtClassifier, classes: list[str], path: str | Path) -> Path:
    """Write a classifier checkpoint atomically; returns its path."""
    save_atomic(classifier_checkpoint_dict(model, classes), path)
    return Path(path)


def classifier_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "") -> CSPNeXtClassifier:
    """The classifier a read checkpoint describes, weights loaded strictly, eval mode."""
    if not is_classifier_checkpoint(ckpt):
        what = "an RTMDet detector checkpoint" if _looks_like_detector(ckpt) else "not a classifier checkpoint"
        raise CheckpointError(f"{path}: {what} (its meta has no task 'classify'); load detectors with "
                              "rtmdet.models.checkpoint.load_model")
    cfg_dict = ckpt["meta"].get("classifier")
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"{path}: classifier checkpoint without meta['classifier'] (its ClassifierConfig)")
    try:
        model = CSPNeXtClassifier(ClassifierConfig.from_dict(cfg_dict))
    except TypeError as exc:
        raise CheckpointError(f"{path}: meta['classifier'] is incomplete ({first_line(exc)})") from None
    sd = extract_state_dict(ckpt, path)
    _check_keys(model, sd, path, strict=True)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[CSPNeXtClassifier, dict[str, Any]]:
    """Build the classifier a checkpoint file describes, load its weights; returns (model, ckpt)."""
    ckpt = read_checkpoint(path)
    return classifier_from_checkpoint(ckpt, path).to(device), ckpt


def _looks_like_detector(ckpt: dict[str, Any]) -> bool:
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    sd = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), dict) else ckpt
    return isinstance(meta.get("rtmdet"), dict) or any(str(k).startswith("bbox_head.") for k in sd)
