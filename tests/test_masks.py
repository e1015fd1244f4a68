"""Instance masks from COCO segmentation fields: polygons and both RLE forms, and each problem named."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from rtmdet.data.masks import check_segmentation, segmentation_to_mask
from rtmdet.errors import DataError

H, W = 20, 30


def _mask(segm):
    reasons, usable = check_segmentation(segm, H, W)
    assert usable is not None, reasons
    return reasons, segmentation_to_mask(usable, H, W)


def test_polygon_and_both_rle_forms_give_the_same_mask():
    square = [[5.0, 4.0, 15.0, 4.0, 15.0, 12.0, 5.0, 12.0]]
    reasons, poly = _mask(square)
    assert reasons == [] and poly.shape == (H, W) and poly.dtype == bool
    assert 70 <= poly.sum() <= 100 and poly[8, 10] and not poly[0, 0]  # about the 10 x 8 square
    compressed = mask_utils.encode(np.asfortranarray(poly.astype(np.uint8)))
    as_text = {"size": [H, W], "counts": compressed["counts"].decode("ascii")}  # as JSON stores it
    flat = poly.flatten(order="F")  # uncompressed RLE: run lengths, column-major, zeros first
    runs = [len(list(group)) for _, group in itertools.groupby(flat)]
    if flat[0]:
        runs.insert(0, 0)
    uncompressed = {"size": [H, W], "counts": runs}
    assert np.array_equal(_mask(as_text)[1], poly) and np.array_equal(_mask(uncompressed)[1], poly)
    two = _mask(square + [[20.0, 14.0, 28.0, 14.0, 28.0, 19.0]])[1]  # two parts: one mask
    assert two.sum() > poly.sum() and two[8, 10] and two[16, 25]


def test_problems_are_named_and_the_usable_part_kept():
    assert check_segmentation([], H, W) == (["no_mask"], None)
    assert check_segmentation(None, H, W) == (["no_mask"], None)
    reasons, usable = check_segmentation([[1.0, 1.0, 2.0, 2.0], [0, 0, 10, 0, 10, 10, 0, 10]], H, W)
    assert reasons == ["degenerate_polygon"] and len(usable) == 1
    assert check_segmentation([[1, 1, 5, 5, 9, 9]], H, W) == (["degenerate_polygon", "no_mask"], None)  # no area
    reasons, usable = check_segmentation([[-5, -5, 40, -5, 40, 25, -5, 25]], H, W)
    assert reasons == ["polygon_outside_image"] and segmentation_to_mask(usable, H, W).all()


@pytest.mark.parametrize("segm,message", [
    ({"counts": "abc"}, "needs 'size'"),
    ({"size": [10, 10], "counts": "abc"}, "RLE segmentation of size 10x10 on an image of 20x30"),
    ("polygon", "must be polygons"),
])
def test_unusable_fields_are_errors(segm, message):
    with pytest.raises(DataError, match=message):
        check_segmentation(segm, H, W)


def test_rle_of_run_boundaries_equals_pycocotools_encode():
    # The CUDA path of masks_to_rles codes runs from boundaries found on the device; here the same
    # helpers on CPU tensors against pycocotools' encoder, with masks that start set and unset.
    import torch

    from rtmdet.data import masks as M

    rng = np.random.default_rng(0)
    for k, h, w in [(6, 7, 9), (40, 64, 96), (2, 1, 1)]:
        m = rng.random((k, h, w)) > 0.6
        m[0] = True
        m[1] = False
        assert M._rles_of_runs(*M._mask_runs(torch.from_numpy(m))) == M.masks_to_rles(m)
    assert M.masks_to_rles(torch.zeros((0, 4, 4), dtype=torch.bool)) == []
