"""Detector: end-to-end parity with mmdetection's test pipeline, inputs, and errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from rtmdet.errors import DataError
from rtmdet.imageio import read_image
from rtmdet.inference import Detector
from rtmdet.inference.preprocess import letterbox

from conftest import random_detector_checkpoint, rel_diff


@pytest.fixture(scope="module")
def e2e(refs):
    return torch.load(refs / "parity_tiny_e2e.pt", weights_only=True)


@pytest.fixture(scope="module")
def photo(e2e, facemask):
    return facemask / "valid" / e2e["image_file"]


def test_letterbox_matches_mmdetection_resize_and_pad(e2e, photo):
    canvas, info = letterbox(read_image(photo), 640)
    resized = e2e["resized_input_uint8"].permute(1, 2, 0).numpy()
    h, w = resized.shape[:2]
    assert np.array_equal(canvas[:h, :w], resized)
    assert (canvas[h:] == 114).all() and (canvas[:, w:] == 114).all()
    assert info.scale_wh == pytest.approx(tuple(e2e["scale_factor_wh"]), abs=0)


@pytest.mark.parametrize("variant", [None, 0])
def test_detector_reproduces_reference_detections(refs, e2e, photo, variant):
    ref = e2e["official"] if variant is None else e2e["variants"][variant]
    thr = 0.001 if variant is None else e2e["variants"][variant]["score_thr"]
    detector = Detector.from_checkpoint(refs / "parity_tiny.pt", image_size=640, score_thr=thr)
    det = detector(photo)
    h, w = e2e["ori_shape"]
    expected = ref["bboxes"].clone()
    expected[:, 0::2] = expected[:, 0::2].clamp(0, w)  # mmdet clips to the padded canvas; we clip to the image
    expected[:, 1::2] = expected[:, 1::2].clamp(0, h)
    assert len(det) == len(ref["scores"])
    assert np.array_equal(det.labels, ref["labels"].numpy())
    # Per tensor, relative to its largest value. Measured here: boxes 7e-7, scores 5e-6 (1 or 2
    # threads); the refs README saw 2.7e-4 px (7e-7) and 4.4e-6 on another CPU. 1e-4 leaves a 20x
    # margin, and a real slip (half a pixel of letterbox offset, a missed clip) is over 1e-3.
    assert rel_diff(det.boxes, expected) <= 1e-4
    assert rel_diff(det.scores, ref["scores"]) <= 1e-4
    assert det.boxes[:, 2].max() <= w and det.boxes[:, 3].max() <= h


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    return random_detector_checkpoint(tmp_path / "nano.pt")


def test_detector_inputs_paths_arrays_lists_and_gray(tiny_checkpoint, tmp_path):
    detector = Detector.from_checkpoint(tiny_checkpoint)
    assert detector.image_size == 64 and detector.class_names == ["cat", "dog"]
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)
    path = tmp_path / "ünïcode photo.png"
    cv2.imencode(".png", img)[1].tofile(str(path))
    one = detector(img)
    from_path, gray = detector([path, img[:, :, 0]])
    assert one.image_hw == (50, 90)
    # batch of one vs batch of two: same pixels, same results up to float summation order (which
    # differs with the batch size: ~1e-6 relative; 1e-4 still catches a mixed-up image)
    assert rel_diff(one.boxes, from_path.boxes) <= 1e-4 and rel_diff(one.scores, from_path.scores) <= 1e-4
    assert len(one) > 0 and one.boxes.dtype == np.float32 and one.labels.dtype == np.int64
    assert (one.boxes[:, 2] <= 90).all() and (one.boxes[:, 3] <= 50).all()
    assert all(n in ("cat", "dog") for n in one.names)
    assert gray.image_hw == (50, 90)


def test_unreadable_image_names_the_file(tiny_checkpoint, tmp_path):
    detector = Detector.from_checkpoint(tiny_checkpoint)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg: not a readable image"):
        detector(broken)
    with pytest.raises(DataError, match=r"nothere\.jpg: image file not found"):
        detector(tmp_path / "nothere.jpg")
