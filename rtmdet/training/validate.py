"""Validation during training: the valid split scored in a second or so, again and again.

What it keeps between validations: the letterboxed images (decoded once when it is built, kept
as uint8 batches in pinned memory when they fit in `cache_bytes`, else read each time by
persistent loader workers) and the COCO ground truth. Each validation then only runs the model over the batches
on its device, the shared batched post-process (rtmdet.inference.postprocess) and the COCO
scoring: the numbers `rtmdet evaluate` gives for the same weights.

The trainer uses `submit`: the GPU part runs at once, the scoring (COCOeval on the CPU, as long
as the inference or longer) in a process of its own (rtmdet.evaluation.score_process) while the
next epoch trains.

With several ranks each one infers its share of the split (every world_size-th image) and rank 0
gathers the detections (over a CPU group) and scores them all: a validation takes 1/world_size of
the time instead of the others waiting for rank 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rtmdet.data.loader import ValDataset, build_dataloader
from rtmdet.data.records import DetectionDataset, DetectionSplit
from rtmdet.evaluation.coco_eval import coco_gt_from_split
from rtmdet.evaluation.score_process import ScoreProcess, make_scorers, score_table
from rtmdet.inference.postprocess import PostprocessConfig, postprocess_batch
from rtmdet.inference.postprocess_ins import InsPostprocessConfig, postprocess_ins_batch

CACHE_BYTES = 2 << 30  # 2 GiB of uint8 canvases: COCO's 5,000 val images at 416 px, facemask's at 2,000+


class BatchCache:
    """A validation loader's batches, kept after the first whole pass when `keep` (they fit in
    memory): later validations reuse them without decoding. A pass cut short leaves it incomplete,
    and the next pass reads the loader again."""

    def __init__(self, loader: Any, keep: bool):
        self.loader = loader
        self.batches: list[dict[str, Any]] | None = [] if keep else None
        self.complete = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.complete:
            yield from self.batches
            return
        if self.batches is not None:
            self.batches.clear()
        for batch in self.loader:  # pinned already when CUDA is there (build_dataloader)
            if self.batches is not None:
                self.batches.append(batch)
            yield batch
        self.complete = self.batches is not None


class Validator:
    """Scores a model on one split; build once per training run, call after the epochs that validate."""

    def __init__(self, split: DetectionSplit, dataset: DetectionDataset, imgsz: int, device: torch.device,
                 batch_size: int = 32, workers: int = 2, cache_bytes: int = CACHE_BYTES,
                 postprocess: PostprocessConfig | None = None, background: bool = False, masks: bool = False,
                 rank: int = 0, world_size: int = 1, group: Any = None):
        """background: start the scoring process now, for `submit` (training); else scoring runs
        in this process. masks: the segment task (an RTMDet-Ins model; the split read with its
        masks): its masks are scored too (segm), with RTMDet-Ins's post-process. rank, world_size,
        group: one of several ranks that validate together (every rank builds one; `group` a gloo
        group of them all); only rank 0 holds the ground truth and returns metrics."""
        self.split, self.dataset, self.imgsz, self.device = split, dataset, imgsz, device
        self.masks, self.rank, self.world_size, self.group = masks, rank, world_size, group
        self.postprocess = postprocess or (InsPostprocessConfig() if masks else PostprocessConfig())
        self.ids = [int(r.image_id) for r in split.records]
        records = split.records[rank::world_size]
        self.index = np.arange(rank, len(split.records), world_size)  # each image of the share in the split
        self.gt = self.scorer = self.mask_scorer = self.scoring = None
        if rank == 0:
            self.gt = coco_gt_from_split(split, dataset, masks=masks)
            self.scorer, self.mask_scorer = make_scorers(self.gt, dataset.classes, dataset.category_ids, masks)
            if background:
                self.scoring = ScoreProcess(self.gt, dataset.classes, dataset.category_ids, self.ids, masks)
        fits = len(records) * 3 * imgsz * imgsz <= cache_bytes
        self.loader = build_dataloader(ValDataset(records, imgsz), batch_size, num_workers=workers,
                                       persistent_workers=not fits and workers > 0)
        self.batches = BatchCache(self.loader, keep=fits)
        self.seconds: dict[str, float] = {}  # where the last validation spent its time
        self.background = background
        # Start the loader's workers now, before torch.compile's machinery (threads, compile
        # workers) is loaded: forking a process that runs threads can deadlock the child.
        if fits:
            for _ in self.batches:
                pass
        elif workers > 0:
            iter(self.loader)

    @property
    def cache(self) -> list[dict[str, Any]] | None:
        return self.batches.batches

    @property
    def cached(self) -> bool:
        """The cache holds the whole share."""
        return self.batches.complete

    def __call__(self, model: nn.Module) -> dict[str, Any] | None:
        """COCO metrics of `model` (EvalResult.to_metrics()); the model's train/eval mode is kept.
        Every rank calls it; ranks other than 0 get None."""
        found = self._gathered(*self.infer(model))
        if found is None:
            return None
        return self._finish(score_table(self.scorer, np.asarray(self.ids, np.int64), *found, self.mask_scorer))

    def submit(self, model: nn.Module) -> Future | None:
        """Infer now (the GPU part) and score in the scoring process (the CPU part, COCOeval):
        training goes on meanwhile. Pass the future to `collect` for __call__'s metrics; one
        validation at a time. Every rank calls it; ranks other than 0 get None."""
        if not self.background:
            raise RuntimeError("Validator.submit needs a Validator built with background=True")
        found = self._gathered(*self.infer(model))
        return None if found is None else self.scoring.submit(*found)

    def _gathered(self, table: np.ndarray, rles: list[dict] | None) -> tuple[np.ndarray, list[dict] | None] | None:
        """Every rank's detections on rank 0, in one table over the whole split (None elsewhere)."""
        if self.world_size == 1:
            return table, rles
        shares = [None] * self.world_size if self.rank == 0 else None
        start = time.perf_counter()
        dist.gather_object((table, rles), shares, dst=0, group=self.group)
        self.seconds["gather"] = time.perf_counter() - start  # rank 0: mostly waiting for the slowest share
        if shares is None:
            return None
        return np.concatenate([t for t, _ in shares]), (None if rles is None else [m for _, ms in shares for m in ms])

    def collect(self, future: Future) -> dict[str, Any]:
        return self._finish(future.result())

    def _finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        self.seconds["scoring"] = metrics.pop("scoring_s")
        metrics["images_per_s"] = len(self.ids) / max(self.seconds["inference"], 1e-9)
        return metrics

    def close(self) -> None:
        # Loader workers first: forked after the scoring process started, they hold its pipe
        # open, and it ends when the pipe closes.
        self.loader.close()
        if self.scoring is not None:
            self.scoring.close()
            self.scoring = None

    @torch.inference_mode()
    def infer(self, model: nn.Module) -> tuple[np.ndarray, list[dict] | None]:
        """Every image's detections (of this rank's share) as one table: [x1, y1, x2, y2, score,
        label, image index in the split]; and with masks, each row's mask as a COCO RLE (else None)."""
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        parts, seen, model_s, post_s = [], 0, 0.0, 0.0
        rles: list[dict] | None = [] if self.masks else None
        for batch in self.batches:
            t0 = time.perf_counter()
            images = batch["images"].to(self.device, non_blocking=True)
            outputs = model(model.normalize(images))  # the segment task's model also gives kernels, mask features
            cls_scores, bbox_preds = outputs[0], outputs[1]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # one per batch: splits model from post-process time
            t1 = time.perf_counter()
            scale, ori = batch["scale_wh"].tolist(), batch["ori_hw"].tolist()
            if self.masks:  # RTMDet-Ins: its masks as RLEs, in the table's row order
                found = []
                for *result, masks in postprocess_ins_batch(outputs, tuple(model.strides), (self.imgsz, self.imgsz),
                                                             scale, ori, self.postprocess):
                    found.append(tuple(result))
                    rles += masks
            else:
                found = postprocess_batch(cls_scores, bbox_preds, tuple(model.strides), (self.imgsz, self.imgsz),
                                          scale, ori, self.postprocess)
            # One device-to-host copy per batch, not three per image.
            ids = torch.cat([torch.full((len(s),), k, dtype=torch.long, device=s.device)
                             for k, (_, s, _) in enumerate(found, start=seen)])
            parts.append(torch.cat([torch.cat([b for b, _, _ in found]), torch.cat([s for _, s, _ in found])[:, None],
                                    torch.cat([lab for _, _, lab in found])[:, None].float(), ids[:, None].float()],
                                   dim=1).cpu().numpy())
            seen += len(found)
            model_s, post_s = model_s + t1 - t0, post_s + time.perf_counter() - t1
        model.train(was_training)
        self.seconds = {"inference": time.perf_counter() - start, "model": model_s, "postprocess": post_s}
        table = np.concatenate(parts) if parts else np.zeros((0, 7), np.float32)
        table[:, 6] = self.index[table[:, 6].astype(np.int64)]  # the share's image -> the split's
        return table, rles

