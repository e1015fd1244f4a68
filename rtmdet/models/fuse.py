"""Fold BatchNorm into the preceding convolution for inference, export and QAT."""

from __future__ import annotations

import copy

import torch
from torch import nn

from rtmdet.models.layers import ConvModule


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv with bias computing bn(conv(x)) in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).to(conv.weight.device)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fuse_conv_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Every ConvModule's conv+BN becomes one conv with bias (eval only; shared head convs
    become one fused conv per level because each level has its own BN)."""
    model = model if inplace else copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, ConvModule) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fold_bn(module.conv, module.bn)
            module.bn = nn.Identity()
    return model.eval()
