"""RandAugment (timm 'increasing' ops, mmpretrain's RSB-A1 settings) on BGR uint8 images."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from rtmdet.data.rand_augment import OPS, apply_op, rand_augment, sample_plan

FILL = (124, 116, 104)  # RGB
FILL_BGR = np.array(FILL[::-1], np.uint8)
TIMM_INCREASING = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
SIGNED = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX",
          "ShearY", "TranslateXRel", "TranslateYRel"}


def _image(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth, colourful BGR image (noise blurred, then stretched)."""
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(noise, (0, 0), 2)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image[..., ::-1]))


def _bgr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[..., ::-1]


# ------------------------------------------------------------------------------------------ randomness

def test_same_seed_gives_identical_output():
    img = _image()
    for seed in range(12):
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        out_a, out_b = rand_augment(img, rng_a, magnitude=9), rand_augment(img, rng_b, magnitude=9)
        np.testing.assert_array_equal(out_a, out_b)
        assert rng_a.random() == rng_b.random()


def test_different_seeds_give_different_outputs():
    img = _image()
    outs = [rand_augment(img, np.random.default_rng(seed)) for seed in range(12)]
    distinct = {out.tobytes() for out in outs}
    assert len(distinct) >= 6
    assert sum(not np.array_equal(out, img) for out in outs) >= 6


def test_successive_draws_of_one_generator_differ():
    img, rng = _image(), np.random.default_rng(3)
    assert len({rand_augment(img, rng).tobytes() for _ in range(10)}) >= 5


def test_global_random_state_is_untouched():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    img = _image()
    for seed in range(20):
        rand_augment(img, np.random.default_rng(seed), magnitude=10)
    assert np.random.random() == expected_np
    assert random.random() == expected_py


def test_rand_augment_applies_its_plan():
    img = _image()
    for seed in range(15):
        plan = sample_plan(np.random.default_rng(seed), 2, 7.0, 0.5, 10.0)
        expected = img
        for name, level, positive in plan:
            expected = apply_op(expected, name, level, positive, FILL)
        np.testing.assert_array_equal(rand_augment(img, np.random.default_rng(seed)), expected)


def test_magnitude_std_zero_gives_fixed_levels():
    levels = []
    for seed in range(200):
        for name, level, _ in sample_plan(np.random.default_rng(seed), 2, 7.0, 0.0, 10.0):
            if name not in {"AutoContrast", "Equalize", "Invert"}:
                levels.append(level)
    assert levels and set(levels) == {0.7}


def test_magnitude_noise_is_normal_and_clipped():
    levels = [level for seed in range(400) for name, level, _ in sample_plan(np.random.default_rng(seed), 2, 9.5, 0.5)
              if name not in {"AutoContrast", "Equalize", "Invert"}]
    levels = np.array(levels)
    assert len(set(levels.tolist())) > 50
    assert levels.max() == 1.0 and levels.min() >= 0.0  # N(9.5, 0.5) often exceeds 10 and is clipped
    assert 0.85 < np.median(levels) < 1.0


@pytest.mark.parametrize("magnitude_std", [0.0, 0.5])
def test_draw_order_follows_mmpretrain(magnitude_std):
    """Op indices first; per op an apply draw, then (if applied) the magnitude noise (only for ops with a
    level and a positive std) and the sign (only for signed ops)."""
    for seed in range(50):
        rng = np.random.default_rng(seed)
        expected = []
        for index in rng.integers(0, len(OPS), size=3):
            name = OPS[index]
            if rng.random() > 0.5:
                continue
            magnitude = 6.0
            if magnitude_std > 0 and name not in {"AutoContrast", "Equalize", "Invert"}:
                magnitude = min(max(rng.normal(6.0, magnitude_std), 0.0), 10.0)
            positive = rng.random() >= 0.5 if name in SIGNED else True
            level = 0.0 if name in {"AutoContrast", "Equalize", "Invert"} else magnitude / 10.0
            expected.append((name, level, positive))
        assert sample_plan(np.random.default_rng(seed), 3, 6.0, magnitude_std, 10.0) == expected


def test_op_choice_apply_probability_and_sign():
    plans = [sample_plan(np.random.default_rng(seed), 2, 7.0, 0.5) for seed in range(3000)]
    entries = [entry for plan in plans for entry in plan]
    assert 0.45 < len(entries) / (2 * len(plans)) < 0.55  # each drawn op applied with probability 0.5
    counts = {name: sum(e[0] == name for e in entries) for name in OPS}
    expected = len(entries) / len(OPS)
    assert all(0.75 * expected < c < 1.25 * expected for c in counts.values()), counts
    signs = [positive for name, _, positive in entries if name in SIGNED]
    assert 0.45 < np.mean(signs) < 0.55
    assert all(positive for name, _, positive in entries if name not in SIGNED)


def test_shape_dtype_kept_and_input_untouched_for_non_square_images():
    img = _image(37, 61)
    before = img.copy()
    for seed in range(60):
        out = rand_augment(img, np.random.default_rng(seed), magnitude=10, num_ops=3)
        assert out.shape == (37, 61, 3) and out.dtype == np.uint8
        assert not np.shares_memory(out, img)
    np.testing.assert_array_equal(img, before)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        rand_augment(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError):
        apply_op(_image(), "Cutout", 0.5, True, FILL)
    with pytest.raises(ValueError):
        apply_op(_image(), "Rotate", 7.0, True, FILL)


# ------------------------------------------------------------------------------------------ single ops

def test_op_list_is_timms_increasing_list():
    assert OPS == TIMM_INCREASING


def test_invert():
    img = _image()
    np.testing.assert_array_equal(apply_op(img, "Invert", 0.0, True, FILL), 255 - img)


@pytest.mark.parametrize("name", ["BrightnessIncreasing", "ContrastIncreasing", "ColorIncreasing",
                                  "SharpnessIncreasing", "Rotate", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel", "SolarizeIncreasing", "SolarizeAdd"])
@pytest.mark.parametrize("positive", [True, False])
def test_level_zero_is_identity(name, positive):
    img = _image(41, 57)
    out = apply_op(img, name, 0.0, positive, FILL)
    assert np.abs(out.astype(int) - img).max() <= 1
    assert not np.array_equal(apply_op(img, name, 1.0, positive, FILL), img)  # and a full level does something


def test_brightness_factors():
    img = np.full((8, 8, 3), 100, np.uint8)
    assert (apply_op(img, "BrightnessIncreasing", 1.0, True, FILL) == 190).all()  # factor 1.9
    assert (apply_op(img, "BrightnessIncreasing", 1.0, False, FILL) == 10).all()  # factor 0.1
    assert (apply_op(img, "BrightnessIncreasing", 0.5, True, FILL) == 145).all()  # factor 1.45


def test_contrast_blends_with_the_mean_gray():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:, 5:] = 200  # mean gray 100
    out = apply_op(img, "ContrastIncreasing", 1.0, False, FILL)  # factor 0.1
    assert (out[:, :5] == 90).all() and (out[:, 5:] == 110).all()
    out = apply_op(img, "ContrastIncreasing", 1.0, True, FILL)  # factor 1.9, saturated
    assert (out[:, :5] == 0).all() and (out[:, 5:] == 255).all()


def test_color_uses_bgr_gray_weights():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 255  # pure blue in BGR: gray = 0.114 * 255 = 29
    out = apply_op(img, "ColorIncreasing", 1.0, False, FILL)  # factor 0.1: 29 + 0.1 (255 - 29) = 51.6
    assert abs(int(out[0, 0, 0]) - 52) <= 1 and abs(int(out[0, 0, 2]) - 26) <= 1
    gray = np.full((4, 4, 3), 77, np.uint8)
    np.testing.assert_array_equal(apply_op(gray, "ColorIncreasing", 1.0, True, FILL), gray)


def test_sharpness_blurs_or_sharpens_the_inside_only():
    img = np.full((9, 9, 3), 100, np.uint8)
    np.testing.assert_array_equal(apply_op(img, "SharpnessIncreasing", 1.0, True, FILL), img)
    img[4, 4] = 230
    img[0, 0] = 230
    blurred = apply_op(img, "SharpnessIncreasing", 1.0, False, FILL)  # 0.1 img + 0.9 smooth
    assert 100 < blurred[4, 4, 0] < 230 and blurred[4, 5, 0] > 100
    assert blurred[0, 0, 0] == 230  # the 1-pixel border is not smoothed (PIL)
    sharpened = apply_op(img, "SharpnessIncreasing", 1.0, True, FILL)
    assert sharpened[4, 4, 0] > 230 and sharpened[4, 5, 0] < 100


@pytest.mark.parametrize("level,mask", [(0.0, 0xF0), (0.3, 0xE0), (0.4, 0xE0), (0.5, 0xC0), (0.7, 0xC0),
                                        (0.99, 0x80), (1.0, 0x00)])
def test_posterize_increasing_keeps_fewer_top_bits_with_level(level, mask):
    img = _image()
    np.testing.assert_array_equal(apply_op(img, "PosterizeIncreasing", level, True, FILL), img & mask)


def test_solarize_inverts_from_the_threshold_up():
    img = np.array([[[0, 127, 128], [200, 255, 64]]], np.uint8)
    out = apply_op(img, "SolarizeIncreasing", 0.5, True, FILL)  # threshold 256 - 128 = 128
    np.testing.assert_array_equal(out, [[[0, 127, 127], [55, 0, 64]]])
    out = apply_op(img, "SolarizeIncreasing", 1.0, True, FILL)  # threshold 0: everything inverted
    np.testing.assert_array_equal(out, 255 - img)


def test_solarize_add_lifts_dark_pixels():
    img = np.array([[[0, 100, 127], [128, 200, 20]]], np.uint8)
    out = apply_op(img, "SolarizeAdd", 1.0, True, FILL)  # +110 below 128, saturating
    np.testing.assert_array_equal(out, [[[110, 210, 237], [128, 200, 130]]])
    out = apply_op(img, "SolarizeAdd", 0.5, True, FILL)  # +55
    np.testing.assert_array_equal(out, [[[55, 155, 182], [128, 200, 75]]])


@pytest.mark.parametrize("name,positive,moved", [("TranslateXRel", True, (60, 95)), ("TranslateXRel", False, (60, 5)),
                                                 ("TranslateYRel", True, (87, 50)), ("TranslateYRel", False, (33, 50))])
def test_translate_moves_content_and_fills(name, positive, moved):
    img = np.full((120, 200, 3), 10, np.uint8)
    img[60, 50] = 255
    out = apply_op(img, name, 0.5, positive, FILL)  # 0.45 x 0.5 x 200 = 45 px across, x 120 = 27 px down
    assert tuple(np.argwhere(out[..., 1] == 255)[0]) == moved and (out[..., 1] == 255).sum() == 1
    if name == "TranslateXRel":
        band = out[:, :45] if positive else out[:, -45:]
        rest = out[:, 45:] if positive else out[:, :-45]
    else:
        band = out[:27] if positive else out[-27:]
        rest = out[27:] if positive else out[:-27]
    assert (band == FILL_BGR).all()
    assert (rest[..., 0] != FILL_BGR[0]).all()


@pytest.mark.parametrize("positive", [True, False])
def test_rotate_constant_image_keeps_inside_and_fills_corners(positive):
    img = np.full((100, 100, 3), (30, 60, 90), np.uint8)
    out = apply_op(img, "Rotate", 1.0, positive, FILL)  # 30 degrees
    yy, xx = np.mgrid[:100, :100]
    inside = (yy - 49.5) ** 2 + (xx - 49.5) ** 2 < 40 ** 2
    assert (out[inside] == (30, 60, 90)).all()
    for y, x in [(0, 0), (0, 99), (99, 0), (99, 99)]:
        np.testing.assert_array_equal(out[y, x], FILL_BGR)


def test_rotate_positive_is_counter_clockwise():
    img = np.zeros((101, 101, 3), np.uint8)
    img[48:53, 78:83] = 255  # a block 30 px right of the centre (50, 50)
    for positive, (dy, dx) in [(True, (-15, 26)), (False, (15, 26))]:
        out = apply_op(img, "Rotate", 1.0, positive, FILL)[..., 0].astype(float)
        out[out == FILL_BGR[0]] = 0
        ys, xs = np.nonzero(out > 128)
        assert abs(ys.mean() - (50 + dy)) < 1.5 and abs(xs.mean() - (50 + dx)) < 1.5


def test_shear_x_moves_rows_in_proportion_to_y():
    img = np.zeros((60, 120, 3), np.uint8)
    img[:, 80] = 255  # a vertical line
    out = apply_op(img, "ShearX", 1.0, True, FILL)  # output (x, y) <- input (x + 0.3 y, y)
    assert out[0, 80, 0] == 255
    assert np.argmax(out[50, :, 1]) == 65
    out = apply_op(img, "ShearY", 1.0, False, FILL)  # output (x, y) <- input (x, y - 0.3 x): column 80 down 24
    assert (out[24:, 80] == 255).all() and (out[:24, 80] == FILL_BGR).all()


def test_auto_contrast_stretches_each_channel():
    img = np.zeros((1, 256, 3), np.uint8)
    img[0, :, 0] = np.linspace(100, 150, 256).round()  # low contrast
    img[0, :, 1] = 77  # flat
    img[0, :, 2] = np.arange(256)  # already full range
    out = apply_op(img, "AutoContrast", 0.0, True, FILL)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    assert out[0, np.argmax(img[0, :, 0] == 125), 0] == 127  # (125 - 100) * 255 / 50, truncated
    assert (out[..., 1] == 77).all()
    np.testing.assert_array_equal(out[..., 2], img[..., 2])


def test_equalize_two_level_image():
    img = np.full((224, 224, 3), 50, np.uint8)
    img[:, 112:, :2] = 200  # blue and green: two levels; red stays flat
    out = apply_op(img, "Equalize", 0.0, True, FILL)
    assert (out[:, :112, :2] == 0).all() and (out[:, 112:, :2] == 255).all()
    assert (out[..., 2] == 50).all()


@pytest.mark.parametrize("name,pil_op", [
    ("AutoContrast", ImageOps.autocontrast), ("Equalize", ImageOps.equalize), ("Invert", ImageOps.invert)])
def test_unleveled_ops_match_pillow(name, pil_op):
    img = _image(48, 70, seed=5) // 2 + 40  # not full range, so AutoContrast and Equalize do work
    np.testing.assert_array_equal(apply_op(img, name, 0.0, True, FILL), _bgr(pil_op(_pil(img))))


@pytest.mark.parametrize("name,enhancer", [("ColorIncreasing", ImageEnhance.Color),
                                           ("ContrastIncreasing", ImageEnhance.Contrast),
                                           ("BrightnessIncreasing", ImageEnhance.Brightness),
                                           ("SharpnessIncreasing", ImageEnhance.Sharpness)])
@pytest.mark.parametrize("positive", [True, False])
def test_enhance_ops_match_pillow_within_rounding(name, enhancer, positive):
    img = _image(48, 70, seed=7)
    factor = 1.0 + (0.63 if positive else -0.63)
    expected = _bgr(enhancer(_pil(img)).enhance(factor)).astype(int)
    diff = np.abs(apply_op(img, name, 0.7, positive, FILL).astype(int) - expected)
    assert diff.max() <= 2 and diff.mean() < 0.6
