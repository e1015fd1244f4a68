"""DataLoader: collate format, determinism under a seed, worker counts, stage switch, sharding."""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rtmdet.data.loader import (
    TrainBatchSampler,
    TrainDataset,
    ValDataset,
    build_dataloader,
    collate,
    set_epoch,
)
from rtmdet.data.pipeline import PipelineConfig, SampleKey, make_batch
from rtmdet.data.records import ImageRecord
from rtmdet.data.show import draw_augmented_grid
from rtmdet.errors import DataError


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
    """14 small images with 1-3 coloured rectangles each, written as PNG."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = []
    for i in range(14):
        w, h = int(rng.integers(70, 121)), int(rng.integers(70, 121))
        image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(12, 40)), int(rng.integers(12, 40))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            image[y : y + bh, x : x + bw] = rng.integers(100, 256, 3)
            boxes.append([x, y, x + bw, y + bh])
        path = root / f"img_{i}.png"
        cv2.imwrite(str(path), image)
        labels = rng.integers(0, 3, len(boxes))
        out.append(ImageRecord(i, path, w, h, np.array(boxes, np.float32), labels.astype(np.int64)))
    return out


def _cfg(size: str = "tiny") -> PipelineConfig:
    return PipelineConfig.for_size(size, 64)


def _epoch(loader, epoch: int, stage: int = 1) -> list[dict]:
    set_epoch(loader, epoch, stage)
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["images"], y["images"])
        and torch.equal(x["boxes"], y["boxes"])
        and torch.equal(x["labels"], y["labels"])
        and x["image_ids"] == y["image_ids"]
        for x, y in zip(a, b)
    )


def test_collate_pads_boxes_and_labels_with_minus_one():
    def item(k: int) -> dict:
        return {
            "image": torch.zeros(3, 8, 8, dtype=torch.uint8),
            "boxes": torch.arange(4 * k, dtype=torch.float32).reshape(k, 4),
            "labels": torch.arange(k, dtype=torch.int64),
            "image_id": k,
        }

    batch = collate([item(2), item(0), item(3)])
    assert batch["images"].shape == (3, 3, 8, 8) and batch["images"].dtype == torch.uint8
    assert batch["boxes"].shape == (3, 3, 4) and batch["boxes"].dtype == torch.float32
    assert batch["labels"].tolist() == [[0, 1, -1], [-1, -1, -1], [0, 1, 2]]
    assert (batch["boxes"][1] == -1).all() and batch["image_ids"] == [2, 0, 3]
    empty = collate([item(0)])
    assert empty["boxes"].shape == (1, 1, 4) and empty["labels"].tolist() == [[-1]]


def test_train_batches_have_the_promised_format(records):
    loader = build_dataloader(TrainDataset(records, _cfg()), batch_size=4, num_workers=0, seed=0)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == 3  # 14 // 4, last partial batch dropped
    for b in batches:
        assert b["images"].shape == (4, 3, 64, 64) and b["images"].dtype == torch.uint8
        n, m, _ = b["boxes"].shape
        assert n == 4 and b["labels"].shape == (4, m) and b["labels"].dtype == torch.int64
        valid = b["labels"] >= 0
        assert valid.any(dim=1).all()  # stage 1 never yields an image without boxes
        boxes = b["boxes"][valid]
        assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_same_seed_same_batches_different_seed_different(records):
    ds = TrainDataset(records, _cfg())
    a = _epoch(build_dataloader(ds, 4, num_workers=0, seed=3), 0)
    b = _epoch(build_dataloader(ds, 4, num_workers=0, seed=3), 0)
    c = _epoch(build_dataloader(ds, 4, num_workers=0, seed=4), 0)
    assert _same(a, b) and not _same(a, c)
    loader = build_dataloader(ds, 4, num_workers=0, seed=3)
    assert not _same(_epoch(loader, 0), _epoch(loader, 1))  # a new epoch reshuffles and redraws


def test_batches_do_not_depend_on_the_number_of_workers(records):
    ds = TrainDataset(records, _cfg("s"))  # s: random_pop caches and mixup with prob 1
    ref = _epoch(build_dataloader(ds, 4, num_workers=0, seed=1), 2)
    two = build_dataloader(ds, 4, num_workers=2, seed=1)
    assert _same(ref, _epoch(two, 2))
    assert _same(_epoch(build_dataloader(ds, 4, num_workers=1, seed=1, persistent_workers=False), 2), ref)


def test_persistent_workers_follow_the_switch_to_stage_2(records):
    ds = TrainDataset(records, _cfg())
    loader = build_dataloader(ds, 4, num_workers=2, seed=5)
    assert loader.persistent_workers
    stage1 = _epoch(loader, 0, stage=1)
    stage2 = _epoch(loader, 1, stage=2)
    back = _epoch(loader, 0, stage=1)
    ref = build_dataloader(ds, 4, num_workers=0, seed=5)
    assert _same(stage1, _epoch(ref, 0, 1)) and _same(stage2, _epoch(ref, 1, 2)) and _same(back, stage1)
    # and stage 2 really is the other pipeline: the same keys made by the stage-2 code
    sampler = TrainBatchSampler(len(ds), 4, seed=5)
    sampler.set_epoch(1, stage=2)
    direct = [collate(ds.__getitems__(keys)) for keys in sampler]
    assert _same(stage2, direct)


def test_a_batch_can_be_remade_alone(records):
    """Resuming mid-epoch: batch i is a function of (seed, epoch, stage, position) only."""
    ds = TrainDataset(records, _cfg())
    sampler = TrainBatchSampler(len(ds), 4, seed=2)
    sampler.set_epoch(7)
    keys = list(sampler)
    full = [make_batch(k, ds, ds.config) for k in keys]
    again = make_batch(keys[2], ds, ds.config)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.boxes, y.boxes) for x, y in zip(full[2], again))


def test_skip_resumes_an_epoch_mid_way(records):
    ds = TrainDataset(records, _cfg())
    loader = build_dataloader(ds, 4, num_workers=0, seed=9)
    whole = _epoch(loader, 4, stage=1)
    set_epoch(loader, 4, stage=1, skip=2)
    assert len(loader) == 1 and loader.batch_sampler.batches_per_epoch() == 3
    assert _same(list(loader), whole[2:])


def test_epochs_in_one_pass_are_the_epochs_one_by_one():
    # The trainer iterates every remaining epoch in one pass (prefetching across epoch ends);
    # it must be exactly the epochs it replaced, with the resumed epoch's skip and stage 2.
    one = TrainBatchSampler(20, 4, seed=5, rank=1, world_size=2)
    expected = []
    for epoch, stage, skip in ((3, 1, 1), (4, 1, 0), (5, 2, 0), (6, 2, 0)):
        one.set_epoch(epoch, stage, skip)
        expected += list(one)
    passes = TrainBatchSampler(20, 4, seed=5, rank=1, world_size=2)
    passes.set_epochs(3, 7, stage2_from=5, skip=1)
    assert len(passes) == len(expected) == 4 * 2 - 1 and list(passes) == expected
    assert {k.stage for keys in expected for k in keys} == {1, 2}
    with pytest.raises(ValueError, match="no epochs"):
        passes.set_epochs(4, 4, stage2_from=0)


def test_sampler_shards_ranks_and_covers_the_epoch():
    full = TrainBatchSampler(40, 4, seed=0)
    full.set_epoch(3)
    order = full.order()
    assert sorted(order.tolist()) == list(range(40))
    shards = [TrainBatchSampler(40, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    seen = [k.index for s in shards for keys in s for k in keys]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(seen) == list(range(40))
    assert all(len(keys[0].history) == 5 and not keys[1].history for keys in full)
    small = TrainBatchSampler(3, 8)  # fewer images than one batch: one full batch, wrapped
    assert len(small) == 1 and [k.index for k in next(iter(small))][:3] != []
    with pytest.raises(ValueError):
        small.set_epoch(0, stage=3)


def test_val_loader_letterboxes_in_order(records):
    loader = build_dataloader(ValDataset(records, 64), batch_size=5, num_workers=0)
    batches = list(loader)
    assert [len(b["image_ids"]) for b in batches] == [5, 5, 4]
    assert [i for b in batches for i in b["image_ids"]] == [r.image_id for r in records]
    b = batches[0]
    assert b["scale_wh"].shape == (5, 2) and b["ori_hw"].tolist()[0] == [records[0].height, records[0].width]
    sx, sy = b["scale_wh"][0].tolist()
    k = len(records[0].labels)
    expected = torch.from_numpy(records[0].boxes) * torch.tensor([sx, sy, sx, sy])
    assert torch.allclose(b["boxes"][0, :k], expected, atol=1e-4)


def test_train_dataset_without_boxes_is_an_error(tmp_path: Path):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((40, 40, 3), np.uint8))
    record = ImageRecord(0, path, 40, 40, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    with pytest.raises(DataError, match="no image with boxes"):
        TrainDataset([record], _cfg())


def test_integer_index_gives_a_sample(records):
    ds = TrainDataset(records, _cfg())
    item = ds[3]
    assert item["image"].shape == (3, 64, 64) and item["boxes"].shape[1] == 4
    assert isinstance(SampleKey(0, 0, 1, 0, 0).history, tuple)


@pytest.mark.parametrize("stage", [1, 2])
def test_show_data_grid(records, tmp_path, stage):
    out = draw_augmented_grid(records, ["a", "b", "c"], tmp_path / "grid.png", 64, n=6, stage=stage)
    grid = cv2.imread(str(out))
    assert grid is not None and grid.shape[1] == 3 * 320 + 2 * 4  # 3 columns of upscaled tiles
    assert grid.shape[0] > 2 * 320 and not list(tmp_path.glob(".*.tmp"))


class _Dies:
    """Garbage in a reference cycle that says which process destroyed it."""

    def __init__(self, marker: Path):
        self.marker, self.me = marker, self

    def __del__(self):
        self.marker.write_text(str(os.getpid()))


class _CollectingValDataset(ValDataset):
    def __getitem__(self, index: int):
        gc.collect()  # what a worker's allocations trigger sooner or later
        return super().__getitem__(index)


def test_workers_never_destroy_the_parents_garbage(records, tmp_path: Path) -> None:
    # A TFLite interpreter left in a cycle by an earlier export was once destroyed in a loader
    # worker, where its destructor waited forever for thread-pool threads a fork does not copy.
    # The parent's garbage must die in the parent, before the workers are forked.
    marker = tmp_path / "destroyed_by"
    _Dies(marker)
    gc.disable()  # keep it uncollected until the loader starts its workers
    try:
        loader = build_dataloader(_CollectingValDataset(records[:2], 64), batch_size=2, num_workers=1)
        list(loader)
    finally:
        gc.enable()
    assert marker.read_text() == str(os.getpid())


_SET_AT_RUN_TIME = "imported"


class _ReportingValDataset(ValDataset):
    """Writes what the worker sees of this module's state: forked workers share the parent's."""

    def __init__(self, records, size, marker: Path):
        super().__init__(records, size)
        self.marker = marker

    def __getitem__(self, index: int):
        self.marker.write_text(_SET_AT_RUN_TIME)
        return super().__getitem__(index)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_workers_are_forked_even_where_spawn_is_the_default(records, tmp_path: Path) -> None:
    # A rank started by train.gpus is a spawned process, and spawn is its default start method:
    # its loader's workers must still be forked (a spawned worker re-imports torch: 3-4 s each).
    global _SET_AT_RUN_TIME
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    _SET_AT_RUN_TIME = "set by the parent"
    marker = tmp_path / "seen"
    try:
        loader = build_dataloader(_ReportingValDataset(records[:2], 64, marker), batch_size=2, num_workers=1)
        assert len(list(loader)) == 1
    finally:
        _SET_AT_RUN_TIME = "imported"
        multiprocessing.set_start_method(previous, force=True)
    assert marker.read_text() == "set by the parent"
