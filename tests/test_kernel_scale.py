"""Per-channel kernel scales of segment exports: the scaled model times its scales is the model,
every channel then spans [-1, 1], and per-tensor int8 keeps the small channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rtmdet.export import ExportError
from rtmdet.export.kernel_scale import apply_kernel_scale, kernel_channel_max, scaled_kernel_model
from rtmdet.export.sidecar import ExportMeta, _check_fields
from rtmdet.models import build_model


def _model_and_images():
    torch.manual_seed(0)
    model = build_model("nano", 3, task="segment", image_size=64).eval()
    with torch.no_grad():  # channels a thousand times apart, as a trained RTMDet-Ins has them
        for conv in model.bbox_head.rtm_kernel:
            conv.weight[::2] *= 1000.0
            conv.bias[::2] *= 1000.0
    images = np.random.default_rng(0).uniform(0, 255, (6, 64, 64, 3)).astype(np.float32)
    return model, images


def _kernels(model, images):
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        return model(model.normalize(x))[2]


def _int8(t: torch.Tensor) -> torch.Tensor:  # one scale for the whole tensor, as a TFLite output has
    lo, hi = t.min(), t.max()
    scale = (hi - lo) / 255
    zero = torch.round(-lo / scale) - 128
    return (torch.clamp(torch.round(t / scale) + zero, -128, 127) - zero) * scale


def test_scaled_kernels_times_their_scales_are_the_models_and_survive_int8():
    model, images = _model_and_images()
    before = model.bbox_head.rtm_kernel[0].weight.clone()
    scaled, scales = scaled_kernel_model(model, images)
    assert [len(s) for s in scales] == [169] * 3 and all(v > 0 for s in scales for v in s)
    plain, normed = _kernels(model, images), _kernels(scaled, images)
    for p, n in zip(plain, apply_kernel_scale(normed, scales)):
        torch.testing.assert_close(n, p, rtol=1e-4, atol=1e-3)
    for peak in kernel_channel_max(scaled, images):
        torch.testing.assert_close(peak, torch.ones_like(peak), rtol=1e-4, atol=1e-6)
    # The small channels (odd ones) under per-tensor int8: lost without scaling, kept with it.
    for p, n, s in zip(plain, normed, scales):
        small = p[:, 1::2]
        err_plain = (_int8(p)[:, 1::2] - small).abs().mean() / small.abs().mean()
        back = apply_kernel_scale([_int8(n)], [s])[0][:, 1::2]
        err_scaled = (back - small).abs().mean() / small.abs().mean()
        assert err_plain > 0.5 and err_scaled < 0.02
    assert torch.equal(model.bbox_head.rtm_kernel[0].weight, before)  # the model itself is untouched


def test_a_sidecar_kernel_scale_of_the_wrong_shape_is_one_line():
    base = dict(format="tflite", precision="int8", normalization="imagenet", mean=[0.0] * 3, std=[1.0] * 3,
                classes=["a"], category_ids=[1], image_size=64, strides=[8, 16, 32],
                cls_outputs=["c8", "c16", "c32"], reg_outputs=["r8", "r16", "r32"], input_name="images",
                kernel_outputs=["k8", "k16", "k32"], mask_output="m")
    _check_fields(Path("x.json"), ExportMeta(**base, kernel_scale=[[1.0] * 169] * 3))
    _check_fields(Path("x.json"), ExportMeta(**base))  # unscaled
    for bad in ([[1.0] * 169] * 2, [[1.0] * 168] * 3, [[0.0] * 169] * 3):
        with pytest.raises(ExportError, match="kernel_scale"):
            _check_fields(Path("x.json"), ExportMeta(**base, kernel_scale=bad))
