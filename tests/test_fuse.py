"""BN folding keeps the outputs (eval mode) and unshares the head convs per level."""

import torch

from rtmdet.models import build_model
from rtmdet.models.fuse import fuse_conv_bn


def test_fused_model_gives_the_same_outputs():
    torch.manual_seed(0)
    model = build_model("nano", 3).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.bbox_head.cls_convs[1][0].conv is not fused.bbox_head.cls_convs[0][0].conv
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        (c0, b0), (c1, b1) = model(x), fused(x)
    for a, b in zip(c0 + b0, c1 + b1):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
