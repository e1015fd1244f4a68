"""RandAugment of the CSPNeXt ImageNet recipe (RSB-A1), on OpenCV BGR uint8 images.

Reproduces mmpretrain's ``RandAugment(policies='timm_increasing', num_policies=2, total_level=10,
magnitude_level=7, magnitude_std=0.5, hparams=dict(pad_val=[104, 116, 124], interpolation='bicubic'))``,
which is timm's ``rand-m7-mstd0.5-inc1`` (``_RAND_INCREASING_TRANSFORMS``): per image, ``num_ops`` ops are
drawn uniformly with replacement from OPS; each is then applied with probability 0.5, at a level
``clip(N(magnitude, magnitude_std), 0, total_level) / total_level`` drawn afresh for that op, and signed ops
(rotate, shear, translate, the four enhance ops) take a random sign with probability 0.5.

Level -> argument (level is the fraction magnitude / total_level, in [0, 1]):

=====================  ==========================================================================
AutoContrast           per channel, min -> 0 and max -> 255 (a flat channel is left alone)
Equalize               per-channel histogram equalisation (PIL ImageOps.equalize's table)
Invert                 255 - x
Rotate                 +-30 deg x level about the image centre
PosterizeIncreasing    keep 4 - int(4 level) top bits (4 .. 0; level 1 gives a black image)
SolarizeIncreasing     invert pixels >= 256 - int(256 level) (level 0 changes nothing)
SolarizeAdd            add int(110 level) to pixels < 128, saturating at 255
ColorIncreasing        blend with the grayscale image, factor 1 +- 0.9 level (0.1 .. 1.9)
ContrastIncreasing     blend with the mean gray level, factor 1 +- 0.9 level
BrightnessIncreasing   blend with black, factor 1 +- 0.9 level
SharpnessIncreasing    blend with PIL's SMOOTH-filtered image, factor 1 +- 0.9 level
ShearX / ShearY        shear factor +-0.3 level (about the top-left corner, as PIL and mmcv)
TranslateXRel / YRel   shift by +-0.45 level of the width / height
=====================  ==========================================================================

Randomness: every draw comes from the numpy Generator passed in, in a fixed order (sample_plan): the
``num_ops`` op indices, then per op its apply draw (``rng.random() <= 0.5``, mmpretrain's rule) and, only when
it is applied, its magnitude noise (``rng.normal``, only when the op has a level and magnitude_std > 0; an
infinite std draws ``uniform(0, magnitude)``, timm's rule) and its sign (``rng.random() < 0.5`` is negative,
only for signed ops). No global, torch or ``random`` state is touched, so the same Generator state gives a
bit-identical image.

Geometry: positive sign = counter-clockwise rotation (as shown, PIL's sense), content moved right / down for
translation, and output (x, y) sampling input (x + f y, y) for ShearX (PIL's affine), (x, y + f x) for ShearY.
The sign is drawn at random, so these conventions do not change the distribution.

``fill`` is the border colour of the geometric ops, given in **RGB** order (like timm's ``img_mean``): the
default (124, 116, 104) is written into the BGR image as (104, 116, 124), which is mmpretrain's pad_val for
its BGR images, i.e. the rounded ImageNet mean.

Known differences from the Pillow reference (timm) and mmcv (mmpretrain):

* resampling is OpenCV's bicubic (fixed-point, 1/32-pixel table, uint8 saturation), not Pillow's; the
  rotation centre is ((w - 1) / 2, (h - 1) / 2) (mmcv's), Pillow uses (w / 2, h / 2);
* the enhance blends round to nearest (cv2.addWeighted / a rounded table, as mmcv does) where Pillow
  truncates, so a pixel may differ by 1;
* grayscale is OpenCV's BGR2GRAY (0.299 R + 0.587 G + 0.114 B, rounded), Pillow's "L" has the same weights
  in fixed point, so a gray value may differ by 1;
* SolarizeAdd / Solarize / Posterize take the integer arguments of timm (mmpretrain keeps float thresholds
  and adds, then truncates; the results are the same for uint8 pixels up to the rounding of the addend).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
UNLEVELED = frozenset({"AutoContrast", "Equalize", "Invert"})  # no magnitude, hence no noise draw
UNSIGNED = UNLEVELED | {"PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"}  # no sign draw
APPLY_PROB = 0.5  # timm's rand_augment_ops prob and mmpretrain's BaseAugTransform default
NEGATIVE_PROB = 0.5
ROTATE_MAX = 30.0  # degrees
SHEAR_MAX = 0.3
TRANSLATE_MAX = 0.45  # fraction of the width / height
ENHANCE_MAX = 0.9  # enhance factor 1 +- 0.9 level
POSTERIZE_BITS = 4
SOLARIZE_ADD_MAX = 110
SOLARIZE_ADD_THRESHOLD = 128
SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL ImageFilter.SMOOTH
_IDENTITY = np.arange(256, dtype=np.float64)
_RGB_MEAN = (124, 116, 104)


# ---------------------------------------------------------------------------------------------- point ops

def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply a 256-entry table (shape (256,) for all channels or (256, 3) per channel)."""
    table = np.clip(table, 0, 255).astype(np.uint8)
    if table.ndim == 2:
        table = table.reshape(256, 1, 3)
    return cv2.LUT(image, table)


def auto_contrast(image: np.ndarray) -> np.ndarray:
    """Per channel, stretch [min, max] linearly onto [0, 255] (truncating, as PIL); flat channels unchanged."""
    extremes = [cv2.minMaxLoc(channel)[:2] for channel in cv2.split(image)]  # ~50x faster than ndarray.min
    lo, hi = np.array(extremes, np.float64).T
    span = hi - lo
    stretched = (_IDENTITY[:, None] - lo) * 255.0 / np.where(span > 0, span, 1.0)  # exact 255 at hi
    table = np.where(span > 0, np.floor(np.clip(stretched, 0, 255)), _IDENTITY[:, None])
    return _lut(image, table)


def _equalize_table(hist: np.ndarray) -> np.ndarray:
    """PIL ImageOps.equalize's table for one channel's histogram (int64, 256 bins)."""
    used = hist[hist > 0]
    if used.size <= 1:
        return _IDENTITY
    step = (int(used.sum()) - int(used[-1])) // 255
    if step == 0:
        return _IDENTITY
    before = np.concatenate(([0], np.cumsum(hist)[:-1]))  # pixels strictly below each value
    return np.minimum((step // 2 + before) // step, 255).astype(np.float64)


def equalize(image: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation."""
    tables = []
    for c in range(3):
        hist = cv2.calcHist([image], [c], None, [256], [0, 256]).ravel().astype(np.int64)
        tables.append(_equalize_table(hist))
    return _lut(image, np.stack(tables, 1))


def invert(image: np.ndarray) -> np.ndarray:
    return cv2.bitwise_not(image)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """Keep the top `bits` bits of every value (0 bits: black)."""
    if bits >= 8:
        return image.copy()
    mask = (0xFF << (8 - bits)) & 0xFF
    return np.bitwise_and(image, np.uint8(mask))


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
    """Invert values >= threshold."""
    return _lut(image, np.where(_IDENTITY >= threshold, 255 - _IDENTITY, _IDENTITY))


def solarize_add(image: np.ndarray, add: int, threshold: int = SOLARIZE_ADD_THRESHOLD) -> np.ndarray:
    """Add `add` to values < threshold, saturating at 255."""
    return _lut(image, np.where(_IDENTITY < threshold, _IDENTITY + add, _IDENTITY))


# -------------------------------------------------------------------------------------------- enhance ops

def _blend(image: np.ndarray, degenerate: np.ndarray, factor: float) -> np.ndarray:
    """degenerate + factor (image - degenerate), rounded and saturated (factor 1: the image itself)."""
    return cv2.addWeighted(image, factor, degenerate, 1.0 - factor, 0.0)


def color(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Color: blend with the (BGR-weighted) grayscale image."""
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return _blend(image, gray, factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Contrast: blend with a constant image of the rounded mean gray level."""
    mean = int(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).mean() + 0.5)
    return _lut(image, np.floor(mean + factor * (_IDENTITY - mean) + 0.5))


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Brightness: blend with black."""
    return _lut(image, np.floor(factor * _IDENTITY + 0.5))


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image whose 1-pixel border is the original."""
    degenerate = image.copy()
    if image.shape[0] > 2 and image.shape[1] > 2:
        smooth = cv2.filter2D(image, -1, SMOOTH_KERNEL, borderType=cv2.BORDER_REPLICATE)
        degenerate[1:-1, 1:-1] = smooth[1:-1, 1:-1]
    return _blend(image, degenerate, factor)


# ------------------------------------------------------------------------------------------- geometric ops

def _border(fill: tuple[int, int, int]) -> tuple[float, float, float, float]:
    """cv2 borderValue (BGR) for an RGB fill."""
    return float(fill[2]), float(fill[1]), float(fill[0]), 0.0


def _warp(image: np.ndarray, matrix: np.ndarray, fill: tuple[int, int, int], flags: int = 0) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_CUBIC | flags,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=_border(fill))


def rotate(image: np.ndarray, degrees: float, fill: tuple[int, int, int]) -> np.ndarray:
    """Rotate counter-clockwise (as displayed) by `degrees` about the image centre."""
    h, w = image.shape[:2]
    return _warp(image, cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), degrees, 1.0), fill)


def shear_x(image: np.ndarray, factor: float, fill: tuple[int, int, int]) -> np.ndarray:
    """Output (x, y) takes input (x + factor y, y)."""
    return _warp(image, np.array([[1, factor, 0], [0, 1, 0]], np.float64), fill, cv2.WARP_INVERSE_MAP)


def shear_y(image: np.ndarray, factor: float, fill: tuple[int, int, int]) -> np.ndarray:
    """Output (x, y) takes input (x, y + factor x)."""
    return _warp(image, np.array([[1, 0, 0], [factor, 1, 0]], np.float64), fill, cv2.WARP_INVERSE_MAP)


def translate(image: np.ndarray, dx: float, dy: float, fill: tuple[int, int, int]) -> np.ndarray:
    """Move the content right by dx and down by dy pixels."""
    return _warp(image, np.array([[1, 0, dx], [0, 1, dy]], np.float64), fill)


# ------------------------------------------------------------------------------------------ level -> op

def _enhance_factor(level: float, positive: bool) -> float:
    delta = ENHANCE_MAX * level
    return max(0.1, 1.0 + (delta if positive else -delta))


def _signed(value: float, positive: bool) -> float:
    return value if positive else -value


_Op = Callable[[np.ndarray, float, bool, tuple[int, int, int]], np.ndarray]
_OP_TABLE: dict[str, _Op] = {
    "AutoContrast": lambda im, lv, pos, fill: auto_contrast(im),
    "Equalize": lambda im, lv, pos, fill: equalize(im),
    "Invert": lambda im, lv, pos, fill: invert(im),
    "Rotate": lambda im, lv, pos, fill: rotate(im, _signed(ROTATE_MAX * lv, pos), fill),
    "PosterizeIncreasing": lambda im, lv, pos, fill: posterize(im, POSTERIZE_BITS - int(lv * POSTERIZE_BITS)),
    "SolarizeIncreasing": lambda im, lv, pos, fill: solarize(im, 256 - int(lv * 256)),
    "SolarizeAdd": lambda im, lv, pos, fill: solarize_add(im, int(lv * SOLARIZE_ADD_MAX)),
    "ColorIncreasing": lambda im, lv, pos, fill: color(im, _enhance_factor(lv, pos)),
    "ContrastIncreasing": lambda im, lv, pos, fill: contrast(im, _enhance_factor(lv, pos)),
    "BrightnessIncreasing": lambda im, lv, pos, fill: brightness(im, _enhance_factor(lv, pos)),
    "SharpnessIncreasing": lambda im, lv, pos, fill: sharpness(im, _enhance_factor(lv, pos)),
    "ShearX": lambda im, lv, pos, fill: shear_x(im, _signed(SHEAR_MAX * lv, pos), fill),
    "ShearY": lambda im, lv, pos, fill: shear_y(im, _signed(SHEAR_MAX * lv, pos), fill),
    "TranslateXRel": lambda im, lv, pos, fill: translate(im, _signed(TRANSLATE_MAX * lv * im.shape[1], pos), 0.0,
                                                         fill),
    "TranslateYRel": lambda im, lv, pos, fill: translate(im, 0.0, _signed(TRANSLATE_MAX * lv * im.shape[0], pos),
                                                         fill),
}
assert tuple(_OP_TABLE) == OPS


def apply_op(image: np.ndarray, name: str, level: float, rng_sign_positive: bool = True,
             fill: tuple[int, int, int] = _RGB_MEAN) -> np.ndarray:
    """One op of OPS on an HxWx3 uint8 BGR image, returning a new array.

    level: the normalised magnitude, magnitude / total_level, in [0, 1] (1 = timm's M10); ignored by the
    unleveled ops. rng_sign_positive: the drawn sign of signed ops (ignored by the others). fill: RGB border
    colour of the geometric ops.
    """
    if name not in _OP_TABLE:
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {OPS}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must lie in [0, 1] (magnitude / total_level), got {level}")
    return _OP_TABLE[name](image, float(level), bool(rng_sign_positive), fill)


# ------------------------------------------------------------------------------------------- RandAugment

def _draw_magnitude(rng: np.random.Generator, magnitude: float, magnitude_std: float) -> float:
    if math.isinf(magnitude_std):
        return float(rng.uniform(0.0, magnitude))
    if magnitude_std > 0:
        return float(rng.normal(magnitude, magnitude_std))
    return float(magnitude)


def sample_plan(rng: np.random.Generator, num_ops: int = 2, magnitude: float = 7.0, magnitude_std: float = 0.5,
                total_level: float = 10.0) -> list[tuple[str, float, bool]]:
    """The ops RandAugment applies, in order, as (name, level in [0, 1], sign positive); skipped ops are absent.

    All draws come from `rng` (order in the module docstring); unleveled ops get level 0, unsigned ops True.
    """
    if num_ops < 1 or total_level <= 0 or magnitude < 0:
        raise ValueError(f"need num_ops >= 1, total_level > 0, magnitude >= 0; got {num_ops}, {total_level}, "
                         f"{magnitude}")
    plan = []
    for index in rng.integers(0, len(OPS), size=num_ops):
        name = OPS[int(index)]
        if rng.random() > APPLY_PROB:
            continue
        level = 0.0
        if name not in UNLEVELED:
            level = min(max(_draw_magnitude(rng, magnitude, magnitude_std), 0.0), total_level) / total_level
        positive = True if name in UNSIGNED else bool(rng.random() >= NEGATIVE_PROB)
        plan.append((name, level, positive))
    return plan


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 7.0,
                 magnitude_std: float = 0.5, total_level: float = 10.0,
                 fill: tuple[int, int, int] = _RGB_MEAN) -> np.ndarray:
    """image: HxWx3 uint8 **BGR** (OpenCV order). Returns a new HxWx3 uint8 BGR array of the same shape.

    mmpretrain's RandAugment(policies='timm_increasing', num_policies=num_ops, magnitude_level=magnitude,
    magnitude_std=magnitude_std, total_level=total_level); fill is the RGB border colour (module docstring).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    out = np.ascontiguousarray(image)
    for name, level, positive in sample_plan(rng, num_ops, magnitude, magnitude_std, total_level):
        out = apply_op(out, name, level, positive, fill)
    return out.copy() if out is image else out
