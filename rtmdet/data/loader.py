"""Datasets, batch sampler, collate and DataLoader for training and validation.

How the trainer drives it:

    train_ds = TrainDataset(records, PipelineConfig.for_size("nano", 192))
    loader = build_dataloader(train_ds, batch_size=32, num_workers=2, seed=0)
    for epoch in range(epochs):
        set_epoch(loader, epoch, stage=2 if epoch >= epochs - stage2_epochs else 1)
        for batch in loader: ...

or, as the trainer does, every epoch in one pass (the workers prefetch across the epochs' ends):

    set_epochs(loader, 0, epochs, stage2_from=epochs - stage2_epochs)
    batches = iter(loader)  # epoch after epoch of batches_per_epoch() batches

The epoch and stage travel inside every sample key that the batch sampler (in the main
process) sends to the workers, so persistent workers switch to stage 2 without being rebuilt,
and a batch is the same for 0, 1 or 8 workers (see rtmdet.data.pipeline).
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    Sampler,
    SequentialSampler,
)

from rtmdet.data.mosaic import Sample
from rtmdet.data.pipeline import (
    WARMUP_HISTORY,
    PipelineConfig,
    SampleKey,
    make_batch,
    make_val_sample,
)
from rtmdet.data.masks import mask_loss_targets, segmentation_to_mask
from rtmdet.data.records import ImageRecord
from rtmdet.errors import DataError
from rtmdet.imageio import read_image

log = logging.getLogger(__name__)


def load_record(record: ImageRecord, masks: bool = True) -> Sample:
    """Decode a record's image (BGR uint8) with its boxes and labels, and its instance masks when
    the record carries segmentations (the segment task) and `masks` is true."""
    image = read_image(record.file)
    boxes = np.asarray(record.boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(record.labels, np.int64).reshape(-1)
    decoded = None
    if masks and record.segmentations is not None:
        h, w = image.shape[:2]
        decoded = np.zeros((len(boxes), h, w), bool)
        for k, segm in enumerate(record.segmentations):
            decoded[k] = segmentation_to_mask(segm, h, w)
    return Sample(image, boxes, labels, int(record.image_id), decoded)


def _chw(image: np.ndarray) -> np.ndarray:
    """HxWx3 -> 3xHxW (cv2.split into the planes: several times faster than a numpy transpose)."""
    out = np.empty((3, *image.shape[:2]), np.uint8)
    cv2.split(image, [out[0], out[1], out[2]])
    return out


def _to_item(sample: Sample) -> dict[str, Any]:
    item = {
        "image": torch.from_numpy(_chw(sample.image)),
        "boxes": torch.from_numpy(np.ascontiguousarray(sample.boxes, np.float32)).reshape(-1, 4),
        "labels": torch.from_numpy(np.ascontiguousarray(sample.labels, np.int64)).reshape(-1),
        "image_id": sample.image_id,
    }
    if sample.masks is not None:  # the segment task: only what its loss reads (see mask_loss_targets)
        sampled, centers = mask_loss_targets(sample.masks)
        item["masks"], item["mask_centers"] = torch.from_numpy(sampled), torch.from_numpy(centers)
    return item


class TrainDataset(Dataset):
    """Training samples over image records; indexed by `SampleKey`s (see TrainBatchSampler).

    Like mmdetection's filter_cfg (filter_empty_gt=True, min_size=32), images without boxes or
    smaller than min_image_size are left out of training; the counts are logged.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        config: PipelineConfig,
        *,
        filter_empty: bool = True,
        min_image_size: int = 32,
    ):
        kept = [r for r in records if min(r.width, r.height) >= min_image_size]
        too_small = len(records) - len(kept)
        empty = sum(1 for r in kept if len(r.labels) == 0)
        if filter_empty:
            kept = [r for r in kept if len(r.labels) > 0]
        if too_small or (filter_empty and empty):
            log.info(
                "training uses %d of %d images (%d without boxes, %d under %d px left out)",
                len(kept), len(records), empty if filter_empty else 0, too_small, min_image_size,
            )
        if not kept:
            raise DataError("training split: no image with boxes to train on")
        self.records = list(kept)
        self.config = config

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Sample:
        """The decoded sample of record index (the pipeline's SampleSource)."""
        return load_record(self.records[index])

    def _key(self, key: SampleKey | int) -> SampleKey:
        if isinstance(key, SampleKey):
            return key
        n = len(self.records)
        history = tuple((key - k) % n for k in range(WARMUP_HISTORY, 0, -1))
        return SampleKey(0, 0, 1, int(key), int(key) % n, history)

    def __getitems__(self, keys: Sequence[SampleKey | int]) -> list[dict[str, Any]]:
        """One whole batch, made in order with batch-local mosaic/mixup caches."""
        return [_to_item(s) for s in make_batch([self._key(k) for k in keys], self, self.config)]

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        return self.__getitems__([key])[0]


class ValDataset(Dataset):
    """Validation samples: the letterboxed image, boxes in canvas pixels, and scale_wh/ori_hw."""

    def __init__(self, records: Sequence[ImageRecord], imgsz: int):
        self.records = list(records)
        self.imgsz = imgsz

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        raw = load_record(record, masks=False)  # validation scores against the annotation file itself
        sample, scale_wh = make_val_sample(raw, self.imgsz)
        item = _to_item(sample)
        item["scale_wh"] = scale_wh
        item["ori_hw"] = raw.image.shape[:2]
        return item


class TrainBatchSampler(Sampler[list[SampleKey]]):
    """Shuffled batches of SampleKeys; epoch and stage are set from the main process.

    With world_size > 1 each rank takes every world_size-th batch of the same global order.
    Batches are always full; drop_last drops the last partial batch (unless it is the only
    one), otherwise it is completed with images from the start of the order.
    """

    def __init__(
        self,
        num_records: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_records < 1 or batch_size < 1:
            raise ValueError("TrainBatchSampler needs at least one record and batch_size >= 1")
        self.n, self.batch_size, self.seed, self.shuffle = num_records, batch_size, seed, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch, self.stage, self.skip = 0, 1, 0
        self.end_epoch, self.stage2_from = 1, 1 << 62  # one epoch of stage 1

    def set_epoch(self, epoch: int, stage: int = 1, skip: int = 0) -> None:
        """Choose the epoch (the shuffle and every random draw), the pipeline stage (1 or 2) and
        how many leading batches to leave out (to resume mid-epoch: the rest are unchanged)."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.epoch, self.stage, self.skip = int(epoch), int(stage), max(int(skip), 0)
        self.end_epoch, self.stage2_from = self.epoch + 1, self.epoch if stage == 2 else 1 << 62

    def set_epochs(self, start: int, end: int, stage2_from: int, skip: int = 0) -> None:
        """Iterate epochs start..end-1 in one pass (stage 2 from epoch stage2_from on), leaving out
        the first `skip` batches of the first: the workers prefetch across the epochs' ends, so a
        new epoch does not wait for its first batches (with a few batches per epoch, that wait
        was a third of a GPU's step time)."""
        if end <= start:
            raise ValueError(f"no epochs to iterate: {start}..{end}")
        self.set_epoch(start, 2 if start >= stage2_from else 1, skip)
        self.end_epoch, self.stage2_from = int(end), int(stage2_from)

    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch on this rank."""
        per_round = self.batch_size * self.world_size
        if self.drop_last and self.n >= per_round:
            return self.n // per_round
        return math.ceil(self.n / per_round)

    def __len__(self) -> int:
        return max(self.batches_per_epoch() * (self.end_epoch - self.epoch) - self.skip, 0)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """Dataset indices in an epoch's order (default: the first epoch set)."""
        if not self.shuffle:
            return np.arange(self.n)
        seq = np.random.SeedSequence([self.seed, self.epoch if epoch is None else epoch], spawn_key=(1,))
        return np.random.Generator(np.random.PCG64(seq)).permutation(self.n)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for epoch in range(self.epoch, self.end_epoch):
            yield from self._epoch(epoch, self.skip if epoch == self.epoch else 0)

    def _epoch(self, epoch: int, skip: int) -> Iterator[list[SampleKey]]:
        order = self.order(epoch)
        stage = 2 if epoch >= self.stage2_from else 1
        for i in range(skip, self.batches_per_epoch()):
            start = (i * self.world_size + self.rank) * self.batch_size  # global batch start
            keys = []
            # Batches are always full: positions past the end wrap around (like DistributedSampler).
            for p in range(start, start + self.batch_size):
                history = tuple(int(order[q % self.n]) for q in range(p - WARMUP_HISTORY, p)) if p == start else ()
                keys.append(SampleKey(self.seed, epoch, stage, p, int(order[p % self.n]), history))
            yield keys


def set_epoch(loader: DataLoader, epoch: int, stage: int = 1, skip: int = 0) -> None:
    """Set epoch, stage and batches to skip on a training loader from build_dataloader.

    Call it before iterating the loader for that epoch (iteration starts the prefetching).
    """
    sampler = loader.batch_sampler
    if not isinstance(sampler, TrainBatchSampler):
        raise TypeError("set_epoch needs a training loader made by build_dataloader")
    sampler.set_epoch(epoch, stage, skip)


def set_epochs(loader: DataLoader, start: int, end: int, stage2_from: int, skip: int = 0) -> None:
    """Epochs start..end-1 as one iteration of a training loader (see TrainBatchSampler.set_epochs)."""
    sampler = loader.batch_sampler
    if not isinstance(sampler, TrainBatchSampler):
        raise TypeError("set_epochs needs a training loader made by build_dataloader")
    sampler.set_epochs(start, end, stage2_from, skip)


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack [3, S, S] uint8 images into [N, 3, S, S], in shared memory inside a worker.

    numpy does the copy: torch's uint8 stack was ~20x slower here. Inside a worker the batch is
    written straight into shared memory (as torch's default_collate does), saving the copy
    that sending it to the main process would otherwise make.
    """
    shape = (len(images), *images[0].shape)
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    np.stack([im.numpy() for im in images], out=out.numpy())
    return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; pad boxes [N, M, 4] and labels [N, M] with -1 (M >= 1; valid = labels >= 0);
    with masks, pad them [N, M, H/4, W/4] and their centres [N, M, 2] with zeros."""
    n = len(samples)
    m = max([1] + [len(s["labels"]) for s in samples])
    boxes = torch.full((n, m, 4), -1.0, dtype=torch.float32)
    labels = torch.full((n, m), -1, dtype=torch.int64)
    for i, s in enumerate(samples):
        k = len(s["labels"])
        boxes[i, :k] = s["boxes"]
        labels[i, :k] = s["labels"]
    batch = {
        "images": _stack_images([s["image"] for s in samples]),
        "boxes": boxes,
        "labels": labels,
        "image_ids": [s["image_id"] for s in samples],
    }
    if all("masks" in s for s in samples):
        h, w = samples[0]["masks"].shape[-2:]
        masks = torch.zeros((n, m, h, w), dtype=torch.uint8)
        centers = torch.zeros((n, m, 2), dtype=torch.float32)
        for i, s in enumerate(samples):
            k = len(s["labels"])
            masks[i, :k], centers[i, :k] = s["masks"], s["mask_centers"]
        batch["masks"], batch["mask_centers"] = masks, centers
    if all("scale_wh" in s for s in samples):
        batch["scale_wh"] = torch.tensor([s["scale_wh"] for s in samples], dtype=torch.float32)
        batch["ori_hw"] = torch.tensor([s["ori_hw"] for s in samples], dtype=torch.int64)
    return batch


def _worker_init(worker_id: int) -> None:
    # The pipeline draws from its own seeded Generators; this only tames third-party code.
    np.random.seed(torch.initial_seed() % 2**32)


def worker_context() -> Any:
    """How loader workers start: forked on Linux, whatever the process's default. A rank started
    by train.gpus (spawned, so spawn is its default too) would otherwise spawn each worker, a
    fresh interpreter importing torch, one after the other: 3-4 s each, a minute for 14 train
    and 4 validation workers. Elsewhere (macOS, Windows) the platform's default."""
    return multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None


class _ForkSafeLoader(DataLoader):
    """A DataLoader whose forked workers start with OpenCV single-threaded.

    Workers are the parallelism, so OpenCV threads inside each would only oversubscribe the
    cores; but calling cv2.setNumThreads in a forked child after the parent used OpenCV's
    thread pool can deadlock (seen here with OpenCV 5.0). So the parent switches OpenCV to one
    thread just while the workers are forked, and the children inherit it.
    """

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        previous = cv2.getNumThreads()
        cv2.setNumThreads(1)
        # The parent's garbage dies in the parent: a worker's garbage collector once ran the
        # destructor of a TFLite interpreter left by an earlier export, which joined thread-pool
        # threads that do not exist in a forked child, and hung. What survives is frozen, so a
        # worker never collects (or destroys) anything of the parent's.
        gc.collect()
        gc.freeze()
        try:
            return super()._get_iterator()
        finally:
            gc.unfreeze()
            cv2.setNumThreads(previous)

    def close(self) -> None:
        """Stop the worker processes now. Persistent workers otherwise stop only when the
        interpreter exits, where torch's shutdown (with a pin-memory thread) waits up to 5 s per
        worker: over a minute at the end of a 14-worker GPU run."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._iterator = None


def build_dataloader(
    dataset: TrainDataset | ValDataset,
    batch_size: int,
    *,
    num_workers: int = 2,
    seed: int = 0,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = 2,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Any = collate,
) -> DataLoader:
    """A DataLoader for a TrainDataset (shuffled keys, see set_epoch) or a ValDataset (in order).
    Another task's datasets fit too: one with `keyed = True` (rtmdet.data.class_loader) is
    sampled like a TrainDataset; collate_fn makes its batches."""
    if isinstance(dataset, TrainDataset) or getattr(dataset, "keyed", False):
        batch_sampler: Sampler = TrainBatchSampler(
            len(dataset), batch_size, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
        )
    else:
        batch_sampler = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    workers = max(int(num_workers), 0)
    return _ForkSafeLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=(workers > 0) if persistent_workers is None else (persistent_workers and workers > 0),
        prefetch_factor=prefetch_factor if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        multiprocessing_context=worker_context() if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
