"""Validation during training: the valid split scored in a second or so, again and again.

What it keeps between validations: the letterboxed images (decoded once when it is built, kept
as uint8 batches in pinned memory when they fit in `cache_bytes`, else read each time by
persistent loader workers) and the COCO ground truth. Each validation then only runs the model over the batches
on its device, the shared batched post-process (rtmdet.inference.postprocess) and the COCO
scoring: the numbers `rtmdet evaluate` gives for the same weights.

The trainer uses `submit`: the GPU part runs at once, the scoring (COCOeval on the CPU, as long
as the inference or longer) in a process of its own (rtmdet.evaluation.score_process) while the
next epoch trains.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from torch import nn

from rtmdet.data.loader import ValDataset, build_dataloader
from rtmdet.data.records import DetectionDataset, DetectionSplit
from rtmdet.evaluation.coco_eval import coco_gt_from_split
from rtmdet.evaluation.score_process import ScoreProcess, make_scorers, score_table
from rtmdet.inference.postprocess import PostprocessConfig, postprocess_batch
from rtmdet.inference.postprocess_ins import InsPostprocessConfig, postprocess_ins_batch

CACHE_BYTES = 2 << 30  # 2 GiB of uint8 canvases: COCO's 5,000 val images at 416 px, facemask's at 2,000+


class Validator:
    """Scores a model on one split; build once per training run, call after the epochs that validate."""

    def __init__(self, split: DetectionSplit, dataset: DetectionDataset, imgsz: int, device: torch.device,
                 batch_size: int = 32, workers: int = 2, cache_bytes: int = CACHE_BYTES,
                 postprocess: PostprocessConfig | None = None, background: bool = False, masks: bool = False):
        """background: start the scoring process now, for `submit` (training); else scoring runs
        in this process. masks: the segment task (an RTMDet-Ins model; the split read with its
        masks): its masks are scored too (segm), with RTMDet-Ins's post-process."""
        self.split, self.dataset, self.imgsz, self.device = split, dataset, imgsz, device
        self.masks = masks
        self.postprocess = postprocess or (InsPostprocessConfig() if masks else PostprocessConfig())
        self.gt = coco_gt_from_split(split, dataset, masks=masks)
        self.scorer, self.mask_scorer = make_scorers(self.gt, dataset.classes, dataset.category_ids, masks)
        self.ids = [int(r.image_id) for r in split.records]
        fits = len(split.records) * 3 * imgsz * imgsz <= cache_bytes
        self.loader = build_dataloader(ValDataset(split.records, imgsz), batch_size, num_workers=workers,
                                       persistent_workers=not fits and workers > 0)
        self.cache: list[dict[str, Any]] | None = [] if fits else None
        self.cached = False  # the cache holds the whole split (a validation cut short leaves it partial)
        self.seconds: dict[str, float] = {}  # where the last validation spent its time
        self.scoring = (ScoreProcess(self.gt, dataset.classes, dataset.category_ids, self.ids, masks)
                        if background else None)
        # Start the loader's workers now, before torch.compile's machinery (threads, compile
        # workers) is loaded: forking a process that runs threads can deadlock the child.
        if fits:
            for _ in self._batches():
                pass
        elif workers > 0:
            iter(self.loader)

    def _batches(self) -> Iterator[dict[str, Any]]:
        if self.cached:
            yield from self.cache
            return
        if self.cache is not None:
            self.cache.clear()
        for batch in self.loader:  # pinned already when CUDA is there (build_dataloader)
            if self.cache is not None:
                self.cache.append(batch)
            yield batch
        self.cached = self.cache is not None

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """COCO metrics of `model` (EvalResult.to_metrics()); the model's train/eval mode is kept."""
        table, rles = self.infer(model)
        return self._finish(score_table(self.scorer, np.asarray(self.ids, np.int64), table, rles, self.mask_scorer))

    def submit(self, model: nn.Module) -> Future:
        """Infer now (the GPU part) and score in the scoring process (the CPU part, COCOeval):
        training goes on meanwhile. Pass the future to `collect` for __call__'s metrics; one
        validation at a time."""
        if self.scoring is None:
            raise RuntimeError("Validator.submit needs a Validator built with background=True")
        return self.scoring.submit(*self.infer(model))

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
        """Every image's detections as one table: [x1, y1, x2, y2, score, label, image index]; and
        with masks, each row's mask as a COCO RLE (else None)."""
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        parts, seen, model_s, post_s = [], 0, 0.0, 0.0
        rles: list[dict] | None = [] if self.masks else None
        for batch in self._batches():
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
        return (np.concatenate(parts) if parts else np.zeros((0, 7), np.float32)), rles

