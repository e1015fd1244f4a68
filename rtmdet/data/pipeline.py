"""RTMDet's train pipelines (stage 1 and stage 2) and the validation pipeline, per model size.

Stage 1 (mmdet, S = training size; values from shared/refs/recipe.json, scaled from S=640):
    CachedMosaic(S) -> RandomResize(2S, ratio_range) -> RandomCrop(S) -> YOLOXHSVRandomAug
    -> RandomFlip(0.5) -> Pad(S, 114) -> CachedMixUp(S, ratio (1, 1))
Stage 2 (the last epochs): RandomResize(S, ratio_range) -> RandomCrop(S) -> HSV -> Flip -> Pad.
Validation: `rtmdet.inference.preprocess.letterbox`, the one inference pre-process.

Determinism: every random draw of the sample at epoch position p comes from a numpy Generator
seeded with (seed, epoch, stage, p). The mosaic and mixup caches are rebuilt for every batch:
they are seeded with the images at the 5 positions before the batch (as if it followed its
predecessor), so a batch depends only on (seed, epoch, stage, its position), never on which
worker made it or how many workers there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rtmdet.data.mosaic import (
    MixUpParams,
    Sample,
    SampleCache,
    mixup,
    mosaic,
    pick_mixup_partner,
)
from rtmdet.data.transforms import (
    Canvas,
    canvas_from_image,
    clip_boxes,
    pad_masks_to,
    pad_to,
    random_crop,
    random_flip,
    random_hsv,
    random_resize,
    render,
    render_masks,
)
from rtmdet.errors import ConfigError
from rtmdet.inference.preprocess import PAD_VALUE, letterbox

# Per size: (RandomResize ratio_range, mosaic cache size, mosaic random_pop,
#            mixup cache size, mixup random_pop, mixup prob). "nano" is built from the tiny config.
_RECIPE: dict[str, tuple[tuple[float, float], int, bool, int, bool, float]] = {
    "nano": ((0.5, 2.0), 20, False, 10, False, 0.5),
    "tiny": ((0.5, 2.0), 20, False, 10, False, 0.5),
    "s": ((0.5, 2.0), 40, True, 20, True, 1.0),
    "m": ((0.1, 2.0), 40, True, 20, True, 1.0),
    "l": ((0.1, 2.0), 40, True, 20, True, 1.0),
    "x": ((0.1, 2.0), 40, True, 20, True, 1.0),
}
WARMUP_HISTORY = 5  # earlier positions whose images seed a batch's caches


@dataclass(frozen=True)
class PipelineConfig:
    """All settings of the training pipelines for one image size (see `for_size`)."""

    imgsz: int
    ratio_range: tuple[float, float] = (0.5, 2.0)
    mosaic_max_cached: int = 40
    mosaic_random_pop: bool = True
    mosaic_center_ratio: tuple[float, float] = (0.5, 1.5)
    mixup_max_cached: int = 20
    mixup_random_pop: bool = True
    mixup_prob: float = 1.0
    mixup_ratio_range: tuple[float, float] = (1.0, 1.0)
    mixup_flip_ratio: float = 0.5
    mixup_max_iters: int = 15
    hsv_deltas: tuple[int, int, int] = (5, 30, 30)
    flip_prob: float = 0.5
    pad_value: int = PAD_VALUE
    max_refetch: int = 50  # mmdet draws another image when a crop keeps no box; we give up after this

    @classmethod
    def for_size(cls, size: str, imgsz: int, ratio_range: Sequence[float] | None = None) -> PipelineConfig:
        """The recipe of model size nano/tiny/s/m/l/x at training size imgsz.

        ratio_range replaces the size's RandomResize range (train.resize_range).
        """
        if size not in _RECIPE:
            raise ConfigError(f"model size {size!r}: unknown, expected one of {', '.join(_RECIPE)}")
        ratio, m_cache, m_pop, x_cache, x_pop, x_prob = _RECIPE[size]
        if ratio_range is not None:
            if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
                raise ConfigError(f"params: train.resize_range must be [low, high] with 0 < low <= high, "
                                  f"got {list(ratio_range)}")
            ratio = (float(ratio_range[0]), float(ratio_range[1]))
        return cls(imgsz, ratio, m_cache, m_pop, mixup_max_cached=x_cache, mixup_random_pop=x_pop, mixup_prob=x_prob)


class SampleSource(Protocol):
    """Where the pipeline gets decoded samples from (the training dataset)."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Sample: ...


@dataclass(frozen=True)
class SampleKey:
    """What a worker needs to make one training sample, sent by the batch sampler.

    history holds the dataset indices at the WARMUP_HISTORY positions before this one; only
    the first key of a batch needs it.
    """

    seed: int
    epoch: int
    stage: int
    position: int
    index: int
    history: tuple[int, ...] = ()


def sample_rng(key: SampleKey, position: int | None = None) -> np.random.Generator:
    """The Generator of one sample position; nothing else feeds randomness into the pipeline."""
    pos = key.position if position is None else position
    seq = np.random.SeedSequence([key.seed, key.epoch, key.stage, pos % (1 << 62)], spawn_key=(2,))
    return np.random.Generator(np.random.PCG64(seq))


def _finish(canvas: Canvas, cfg: PipelineConfig, rng: np.random.Generator) -> Sample:
    """Render a cropped canvas (and its masks), then HSV, flip and pad to imgsz."""
    image = random_hsv(render(canvas), rng, cfg.hsv_deltas)
    masks = None if canvas.instances is None else render_masks(canvas)
    image, boxes, masks = random_flip(image, canvas.boxes, rng, cfg.flip_prob, masks)
    masks = None if masks is None else pad_masks_to(masks, cfg.imgsz)
    return Sample(pad_to(image, cfg.imgsz, cfg.pad_value), boxes, canvas.labels, canvas.image_id, masks)


class _BatchState:
    """The caches of one batch."""

    def __init__(self, cfg: PipelineConfig):
        self.mosaic: SampleCache[Sample] = SampleCache(cfg.mosaic_max_cached, cfg.mosaic_random_pop)
        self.mixup: SampleCache[Sample] = SampleCache(cfg.mixup_max_cached, cfg.mixup_random_pop)


def _stage1_before_mixup(
    index: int, rng: np.random.Generator, source: SampleSource, state: _BatchState, cfg: PipelineConfig
) -> Sample:
    """CachedMosaic .. Pad for one sample, drawing another image when the crop keeps no box."""
    for attempt in range(cfg.max_refetch):
        raw = source.load(index)
        state.mosaic.push(raw, rng)
        if len(state.mosaic) > 4:  # mmdet's rule: mosaic once the cache holds more than 4
            partners = [state.mosaic.older(rng) for _ in range(3)]
            canvas = mosaic([raw, *partners], cfg.imgsz, cfg.mosaic_center_ratio, rng, cfg.pad_value)
        else:
            canvas = canvas_from_image(raw.image, raw.boxes, raw.labels, raw.image_id, cfg.pad_value, raw.masks)
        canvas = random_resize(canvas, 2 * cfg.imgsz, cfg.ratio_range, rng)
        cropped = random_crop(canvas, cfg.imgsz, rng, allow_negative_crop=attempt == cfg.max_refetch - 1)
        if cropped is not None:
            return _finish(cropped, cfg, rng)
        index = int(rng.integers(0, len(source)))
    raise AssertionError("unreachable: the last attempt allows an empty crop")


def _stage1_sample(key: SampleKey, source: SampleSource, state: _BatchState, cfg: PipelineConfig) -> Sample:
    """One stage-1 sample: mosaic pipeline, then CachedMixUp."""
    rng = sample_rng(key)
    sample = _stage1_before_mixup(key.index, rng, source, state, cfg)
    if cfg.mixup_prob <= 0:
        return sample
    state.mixup.push(sample, rng)
    if len(state.mixup) <= 1 or rng.uniform(0, 1) > cfg.mixup_prob:
        return sample
    partner = pick_mixup_partner(state.mixup, rng, cfg.mixup_max_iters)
    params = MixUpParams(cfg.imgsz, cfg.mixup_ratio_range, cfg.mixup_flip_ratio, cfg.mixup_max_iters, cfg.pad_value)
    return mixup(sample, partner, params, rng)


def _warm_up(first: SampleKey, source: SampleSource, state: _BatchState, cfg: PipelineConfig) -> None:
    """Seed the caches as if the batch followed the samples before it."""
    history = first.history[-WARMUP_HISTORY:]
    if not history:
        return
    rng = sample_rng(first, first.position - 1)
    for index in history[:-1]:
        state.mosaic.push(source.load(index), rng)
    if cfg.mixup_prob > 0:
        # The sample just before this batch, made up to the mixup step, seeds the mixup cache.
        state.mixup.push(_stage1_before_mixup(history[-1], rng, source, state, cfg), rng)
    else:
        state.mosaic.push(source.load(history[-1]), rng)


def make_stage1_batch(keys: Sequence[SampleKey], source: SampleSource, cfg: PipelineConfig) -> list[Sample]:
    """Stage-1 samples for the keys of one batch, in order, with batch-local caches."""
    state = _BatchState(cfg)
    if keys:
        _warm_up(keys[0], source, state, cfg)
    return [_stage1_sample(key, source, state, cfg) for key in keys]


def make_stage2_sample(key: SampleKey, source: SampleSource, cfg: PipelineConfig) -> Sample:
    """One stage-2 sample: RandomResize(S) -> RandomCrop -> HSV -> Flip -> Pad (no mosaic/mixup)."""
    rng = sample_rng(key)
    index = key.index
    for attempt in range(cfg.max_refetch):
        raw = source.load(index)
        canvas = canvas_from_image(raw.image, raw.boxes, raw.labels, raw.image_id, cfg.pad_value, raw.masks)
        canvas = random_resize(canvas, cfg.imgsz, cfg.ratio_range, rng)
        cropped = random_crop(canvas, cfg.imgsz, rng, allow_negative_crop=attempt == cfg.max_refetch - 1)
        if cropped is not None:
            return _finish(cropped, cfg, rng)
        index = int(rng.integers(0, len(source)))
    raise AssertionError("unreachable: the last attempt allows an empty crop")


def make_batch(keys: Sequence[SampleKey], source: SampleSource, cfg: PipelineConfig) -> list[Sample]:
    """Training samples for one batch of keys (all keys of a batch share epoch and stage)."""
    if keys and keys[0].stage == 2:
        return [make_stage2_sample(key, source, cfg) for key in keys]
    return make_stage1_batch(keys, source, cfg)


def make_val_sample(raw: Sample, imgsz: int) -> tuple[Sample, tuple[float, float]]:
    """The validation sample: letterbox (the inference pre-process); returns it and scale_wh."""
    canvas, info = letterbox(raw.image, imgsz)
    sx, sy = info.scale_wh
    boxes = raw.boxes * np.array([sx, sy, sx, sy], np.float32)
    boxes, labels = clip_boxes(boxes, raw.labels, info.resized_hw[1], info.resized_hw[0], min_size=0.0)
    return Sample(canvas, boxes, labels, raw.image_id), (sx, sy)
