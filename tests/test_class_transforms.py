"""Classifier transforms: sizes, the crop's area and ratio ranges, determinism, the eval view."""

from __future__ import annotations

import numpy as np

from rtmdet.data.class_transforms import crop_region, eval_transform, random_resized_crop, train_transform


def _image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)


def test_crop_regions_have_areas_and_ratios_in_range():
    regions = [crop_region(300, 400, np.random.default_rng(seed)) for seed in range(300)]
    for top, left, ch, cw in regions:
        assert 0 <= top <= 300 - ch and 0 <= left <= 400 - cw
    fractions = np.array([ch * cw / (300 * 400) for _, _, ch, cw in regions])
    ratios = np.array([cw / ch for _, _, ch, cw in regions])
    assert fractions.min() >= 0.08 * 0.95 and fractions.max() <= 1.0
    assert ratios.min() >= 0.75 * 0.97 and ratios.max() <= 4 / 3 * 1.03  # rounding to whole pixels
    assert fractions.std() > 0.15 and len({r[:2] for r in regions}) > 250  # spread, not one region
    # An image far outside the ratio range falls back to its largest centred in-range region.
    assert crop_region(400, 40, np.random.default_rng(0), scale=(0.99, 1.0)) == (173, 0, 53, 40)
    assert random_resized_crop(_image(300, 400), 64, np.random.default_rng(0)).shape == (64, 64, 3)


def test_same_generator_same_view_and_flip_happens():
    image = _image(120, 160)
    a = train_transform(image, 96, np.random.default_rng(7))
    b = train_transform(image, 96, np.random.default_rng(7))
    assert np.array_equal(a, b)
    flips = 0
    for seed in range(40):
        crop = random_resized_crop(image, 96, np.random.default_rng(seed))
        view = train_transform(image, 96, np.random.default_rng(seed))
        flips += not np.array_equal(view, crop)
        assert np.array_equal(view, crop) or np.array_equal(view, crop[:, ::-1])
    assert 5 < flips < 35


def test_eval_view_resizes_the_short_edge_and_takes_the_centre():
    image = _image(200, 300)
    out = eval_transform(image, 224)
    assert out.shape == (224, 224, 3)
    # short edge 200 -> 256, long 300 -> 384; the centre 224 starts at (16, 80) of the resized image
    resized = eval_transform(_image(256, 384), 224)
    assert np.array_equal(resized, _image(256, 384)[16:240, 80:304])
