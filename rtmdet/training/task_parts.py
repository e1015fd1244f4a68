"""What differs between the task families the one trainer runs: how the data is read and sampled,
which model is built, how it is validated, and what its checkpoint holds.

Boxes (detect, segment): COCO datasets, RTMDet / RTMDet-Ins, COCO validation, mmdetection-layout
checkpoints. Classes (classify): class-folder datasets, CSPNeXt classifiers, top-1 validation,
mmpretrain-layout checkpoints. The trainer (rtmdet.training.trainer) only calls these methods;
rtmdet.training.tasks maps each model.task to its parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.errors import ConfigError

log = logging.getLogger(__name__)


class BoxParts:
    """detect and segment: the detector path as it always was."""

    distills = True  # train.teacher works here
    uses_priors = True  # the loss reads the point priors of the model's levels

    def prepare(self, data: DataParams, model: ModelParams, masks: bool, out_dir: Path, reports: Path) -> None:
        """The prepare stage: validate the COCO dataset, write its normalized copy, statistics and charts,
        and a grid of augmented training samples."""
        from rtmdet.data.coco import load_dataset
        from rtmdet.data.prepare import plot_stats, prepare
        from rtmdet.data.show import draw_augmented_grid
        from rtmdet.fileio import write_json_atomic

        splits = data.split_files()
        dataset = load_dataset(data.root if splits is None else Path(data.root), splits=splits, masks=masks)
        stats = prepare(dataset, out_dir, model.imgsz, data.num_classes, masks=masks)
        write_json_atomic(reports / "stats.json", stats)  # images/boxes per class, sizes, skipped per reason
        plot_stats(stats, reports)
        draw_augmented_grid(dataset.splits["train"].records, dataset.classes, reports / "augmented.png",
                            model.imgsz, size=model.size)

    def load_prepared(self, prepared_dir: Path, masks: bool) -> Any:
        """What the prepare stage wrote, for the later stages."""
        from rtmdet.data.prepare import load_prepared

        return load_prepared(prepared_dir, masks=masks)

    def read_dataset(self, data: DataParams, masks: bool) -> Any:
        from rtmdet.training.build import dataset_from_params

        return dataset_from_params(data, masks=masks)

    def digest(self, dataset: Any) -> str:
        from rtmdet.training.state import dataset_digest

        return dataset_digest(dataset)

    def build_model(self, params: ModelParams, num_classes: int, seed: int) -> nn.Module:
        from rtmdet.training.build import build_train_model

        return build_train_model(params, num_classes, seed)

    def train_data(self, dataset: Any, model: ModelParams, train: TrainParams) -> tuple[Any, Any]:
        """The training Dataset and its collate function."""
        from rtmdet.data.loader import TrainDataset, collate
        from rtmdet.data.pipeline import PipelineConfig

        config = PipelineConfig.for_size(model.size, model.imgsz, train.resize_range)
        return TrainDataset(dataset.splits["train"].records, config), collate

    def validator(self, dataset: Any, imgsz: int, device: torch.device, batch_size: int, workers: int,
                  masks: bool, rank: int, world_size: int, group: Any) -> Any:
        from rtmdet.training.validate import Validator

        valid = dataset.splits.get("valid")
        if valid is None or not valid.records:
            return None
        return Validator(valid, dataset, imgsz, device, batch_size=batch_size, workers=workers, background=True,
                         masks=masks, rank=rank, world_size=world_size, group=group)

    def checkpoint(self, weights: nn.Module, dataset: Any) -> dict[str, Any]:
        """The weights in mmdetection's checkpoint layout (the trainer adds the run's meta)."""
        from rtmdet.models.checkpoint import checkpoint_dict

        return checkpoint_dict(weights, dataset.classes, dataset.category_ids, extra_meta={"mmdet_compatible": True})


class ClassParts:
    """classify: CSPNeXt classifiers on class-folder datasets."""

    distills = False
    uses_priors = False

    def prepare(self, data: DataParams, model: ModelParams, masks: bool, out_dir: Path, reports: Path) -> None:
        """The prepare stage: check the class folders (or cut a detection dataset's boxes into them),
        list them, and write their statistics."""
        from rtmdet.data.prepare_classes import prepare_classes
        from rtmdet.fileio import write_json_atomic

        write_json_atomic(reports / "stats.json", prepare_classes(data, out_dir))

    def load_prepared(self, prepared_dir: Path, masks: bool) -> Any:
        from rtmdet.data.prepare_classes import load_prepared_classes

        return load_prepared_classes(prepared_dir)

    def read_dataset(self, data: DataParams, masks: bool) -> Any:
        from rtmdet.data.class_folders import load_class_folders

        explicit = [k for k in ("train_ann_file", "val_ann_file", "test_ann_file") if getattr(data, k)]
        if explicit:
            raise ConfigError(f"model.task classify reads class folders (root/train/<class>/...); "
                              f"data.{explicit[0]} applies to COCO datasets only")
        dataset = load_class_folders(data.root)
        return check_num_classes(data, dataset)

    def digest(self, dataset: Any) -> str:
        h = hashlib.sha256(json.dumps(list(dataset.classes)).encode())
        for im in dataset.splits["train"].images:
            h.update(f"{im.file.parent.name}/{im.file.name}:{im.label}\n".encode())
        return h.hexdigest()[:16]

    def build_model(self, params: ModelParams, num_classes: int, seed: int) -> nn.Module:
        from rtmdet.models.classifier import build_classifier

        if params.normalization is not None:
            raise ConfigError("model.normalization applies to detectors; a classifier takes mmpretrain's "
                              "ImageNet mean/std (leave it null)")
        torch.manual_seed(seed)  # the same initial weights on every rank and on every resume
        model = build_classifier(params.size, num_classes, params.act, channel_attention=params.channel_attention,
                                 image_size=params.imgsz)
        if params.init:
            load_classifier_init(model, params.init)
            log.info("initialized from %s", params.init)
        return model

    def train_data(self, dataset: Any, model: ModelParams, train: TrainParams) -> tuple[Any, Any]:
        from rtmdet.data.class_loader import ClassTrainDataset, collate_classes

        return ClassTrainDataset(dataset.splits["train"].images, len(dataset.classes), model.imgsz), collate_classes

    def validator(self, dataset: Any, imgsz: int, device: torch.device, batch_size: int, workers: int,
                  masks: bool, rank: int, world_size: int, group: Any) -> Any:
        from rtmdet.training.validate_cls import ClassValidator

        val = dataset.splits.get("val")
        if val is None or not val.images:
            return None
        return ClassValidator(val.images, dataset.classes, imgsz, device, batch_size=batch_size, workers=workers,
                              rank=rank, world_size=world_size, group=group)

    def checkpoint(self, weights: nn.Module, dataset: Any) -> dict[str, Any]:
        """The weights in mmpretrain's keys with meta task classify (the trainer adds the run's meta)."""
        from rtmdet.models.checkpoint import classifier_checkpoint_dict

        return classifier_checkpoint_dict(weights, dataset.classes)


class RotParts:
    """rotate: RTMDet-R on DOTA-layout datasets (rtmdet.data.dota) or COCO instance polygons
    (rtmdet.data.coco_rotated), rotated mAP validation, MMRotate-layout checkpoints."""

    distills = False
    uses_priors = True

    def prepare(self, data: DataParams, model: ModelParams, masks: bool, out_dir: Path, reports: Path) -> None:
        """The prepare stage: check the dataset, write its rotated boxes' listing and statistics, and
        a grid of augmented training samples with their rotated boxes."""
        from rtmdet.data.dota import summarize, write_prepared
        from rtmdet.fileio import write_json_atomic

        dataset = self.read_dataset(data, masks)
        write_prepared(dataset, out_dir)
        write_json_atomic(reports / "stats.json", summarize(dataset))
        _rotated_augmented_grid(dataset, model.imgsz, reports / "augmented.png")

    def load_prepared(self, prepared_dir: Path, masks: bool) -> Any:
        from rtmdet.data.dota import read_prepared

        return read_prepared(prepared_dir)

    def read_dataset(self, data: DataParams, masks: bool) -> Any:
        """A DOTA-layout folder (train/labelTxt or train/annfiles), else a COCO dataset whose
        instance segmentations become rotated boxes (rtmdet.data.coco_rotated)."""
        from rtmdet.data.coco_rotated import load_coco_rotated
        from rtmdet.data.dota import LABEL_FOLDERS, load_dota

        splits = data.split_files()
        train = Path(data.root or ".") / "train"
        if splits is None and any((train / name).is_dir() for name in LABEL_FOLDERS):
            dataset = load_dota(data.root)
        else:
            dataset = load_coco_rotated(data.root if splits is None else Path(data.root), splits=splits)
        return check_num_classes(data, dataset)

    def digest(self, dataset: Any) -> str:
        import numpy as np

        h = hashlib.sha256(json.dumps(list(dataset.classes)).encode())
        for r in dataset.splits["train"].records:
            h.update(r.file.name.encode())
            h.update(np.ascontiguousarray(r.rboxes, np.float32).tobytes())
            h.update(np.ascontiguousarray(r.labels, np.int64).tobytes())
        return h.hexdigest()[:16]

    def build_model(self, params: ModelParams, num_classes: int, seed: int) -> nn.Module:
        from rtmdet.training.build import build_train_model

        return build_train_model(params, num_classes, seed)

    def train_data(self, dataset: Any, model: ModelParams, train: TrainParams) -> tuple[Any, Any]:
        """MMRotate's dota_rr.py pipeline (rtmdet.data.rotated_pipeline) on the images with boxes."""
        from rtmdet.data.rotated_pipeline import RotatedPipelineConfig, RotatedTrainDataset, collate_rotated

        config = RotatedPipelineConfig(model.imgsz, ratio_range=tuple(train.resize_range or (1.0, 1.0)))
        return RotatedTrainDataset(dataset.splits["train"].records, config, train.seed, filter_empty=True), \
            collate_rotated

    def validator(self, dataset: Any, imgsz: int, device: torch.device, batch_size: int, workers: int,
                  masks: bool, rank: int, world_size: int, group: Any) -> Any:
        from rtmdet.training.validate_rotated import RotatedValidator

        val = dataset.validation()
        if val is None or not val.records:
            return None
        return RotatedValidator(val.records, dataset.classes, imgsz, device, batch_size=batch_size, rank=rank,
                                world_size=world_size, group=group)

    def checkpoint(self, weights: nn.Module, dataset: Any) -> dict[str, Any]:
        """The weights in MMRotate's RTMDet-R keys (the trainer adds the run's meta)."""
        from rtmdet.models.checkpoint import checkpoint_dict

        return checkpoint_dict(weights, dataset.classes, extra_meta={"mmrotate_compatible": True})


def _rotated_augmented_grid(dataset: Any, imgsz: int, path: Path, count: int = 8, tile: int = 256) -> None:
    """reports/prepare/augmented.png of the rotate task: the first training samples as the trainer's
    pipeline makes them (epoch 0), their rotated boxes drawn."""
    import cv2
    import numpy as np

    from rtmdet.data.pipeline import SampleKey
    from rtmdet.data.rotated_pipeline import RotatedPipelineConfig, RotatedTrainDataset
    from rtmdet.fileio import write_atomic
    from rtmdet.visualize import draw_rboxes

    train = RotatedTrainDataset(dataset.splits["train"].records, RotatedPipelineConfig(imgsz), filter_empty=True)
    tiles = []
    for i in range(min(count, len(train))):
        image, rboxes, labels = train[SampleKey(0, 0, 1, i, i)]
        small = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
        tiles.append(draw_rboxes(small, rboxes, labels, np.zeros(len(labels), bool), tile / imgsz))
    tiles += [np.full((tile, tile, 3), 255, np.uint8)] * (-len(tiles) % 4)
    rows = [np.hstack(tiles[k:k + 4]) for k in range(0, len(tiles), 4)]
    ok, png = cv2.imencode(".png", np.vstack(rows))
    write_atomic(path, png.tobytes())


def check_num_classes(data: DataParams, dataset: Any) -> Any:
    """The dataset, or one error when data.num_classes is set and differs from its class count."""
    if data.num_classes is not None and data.num_classes != len(dataset.classes):
        raise ConfigError(f"data.num_classes is {data.num_classes} but {data.root} has {len(dataset.classes)} "
                          f"classes ({', '.join(dataset.classes)})")
    return dataset


def load_classifier_init(model: nn.Module, path: str) -> None:
    """model.init for a classifier: a classifier checkpoint (ours or mmpretrain's; its head too when
    the class count matches), or any checkpoint with CSPNeXt backbone weights (a detector's)."""
    from rtmdet.models.checkpoint import CheckpointError, extract_state_dict, read_checkpoint

    sd = extract_state_dict(read_checkpoint(path), path)
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not backbone:
        backbone = {k: v for k, v in sd.items() if k.startswith(("stem.", "stage"))}
    own = model.backbone.state_dict()
    if not backbone or set(backbone) != set(own) or any(own[k].shape != v.shape for k, v in backbone.items()):
        raise CheckpointError(f"{path}: holds no CSPNeXt backbone of the {model.cfg.size} classifier "
                              f"({len(backbone)} backbone tensors, the model has {len(own)})")
    model.backbone.load_state_dict(backbone)
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    own_head = model.head.state_dict()
    if head and set(head) == set(own_head) and all(own_head[k].shape == v.shape for k, v in head.items()):
        model.head.load_state_dict(head)
    elif head:
        log.info("%s: a head of another class count; the head stays initialized", path)
