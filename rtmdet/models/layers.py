"""Building blocks shared by backbone, neck and head, named as mmdetection names them.

Attribute names (`conv`, `bn`, `depthwise_conv`, `pointwise_conv`, `fc`, ...) are part of the
state-dict contract with mmdetection's checkpoints: do not rename them.
"""

from __future__ import annotations

import torch
from torch import nn

from rtmdet.errors import ConfigError

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6}

# mmdetection's RTMDet configs use SyncBN with the torch defaults (see refs README).
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def make_act(name: str) -> nn.Module:
    """An activation module by name: silu, relu or relu6."""
    try:
        return ACTIVATIONS[name](inplace=True)
    except KeyError:
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ConfigError(f"unknown activation {name!r}; valid activations: {valid}") from None


class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm -> activation, as mmcv's ConvModule with a norm layer."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str = "silu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.activate = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise ConvModule followed by a pointwise ConvModule, each with BN and activation."""

    def __init__(self, cin: int, cout: int, k: int, act: str = "silu"):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, k, groups=cin, act=act)
        self.pointwise_conv = ConvModule(cin, cout, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class ChannelAttention(nn.Module):
    """Global average pool -> 1x1 conv with bias -> Hardsigmoid -> scale the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act(self.fc(self.global_avgpool(x)))


class CSPNeXtBlock(nn.Module):
    """3x3 conv then a 5x5 depthwise-separable conv, with an optional identity shortcut."""

    def __init__(self, cin: int, cout: int, add_identity: bool, act: str):
        super().__init__()
        self.conv1 = ConvModule(cin, cout, 3, act=act)
        self.conv2 = DepthwiseSeparableConvModule(cout, cout, 5, act=act)
        self.add_identity = add_identity and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    """Cross-stage partial layer: blocks on one half, concat [main, short], attention, 1x1 fuse."""

    def __init__(
        self,
        cin: int,
        cout: int,
        num_blocks: int,
        add_identity: bool,
        channel_attention: bool,
        act: str,
        expand_ratio: float = 0.5,
    ):
        super().__init__()
        mid = int(cout * expand_ratio)
        # Registration order matches mmdetection's, so state_dict() lists keys in its order.
        self.main_conv = ConvModule(cin, mid, 1, act=act)
        self.short_conv = ConvModule(cin, mid, 1, act=act)
        self.final_conv = ConvModule(2 * mid, cout, 1, act=act)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, mid, add_identity, act) for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid) if channel_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = self.short_conv(x)
        main = self.blocks(self.main_conv(x))
        out = torch.cat((main, short), dim=1)
        if self.attention is not None:
            out = self.attention(out)
        return self.final_conv(out)


class SPPBottleneck(nn.Module):
    """1x1 conv to half width, concat [x, maxpool5, maxpool9, maxpool13], 1x1 conv."""

    def __init__(self, cin: int, cout: int, act: str, kernel_sizes: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        mid = cin // 2
        self.conv1 = ConvModule(cin, mid, 1, act=act)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvModule(mid * (len(kernel_sizes) + 1), cout, 1, act=act)

        # Max pools of stride 1 compose: pool_a(pool_b(x)) == pool_(a+b-1)(x) exactly (the padding
        # never wins a max). With kernels 5, 9, 13 each pool runs on the previous one's output as a
        # 5x5 (SPPF): the same numbers for a fraction of the work (tiny at 640 on an H200, fp16:
        # 0.31 ms of max_pool kernels per forward as 5/9/13).
        sizes = [p.kernel_size for p in self.poolings]
        steps = [b - a + 1 for a, b in zip([1] + sizes, sizes)]
        self.chain = all(s == steps[0] and s % 2 == 1 for s in steps)
        if self.chain:
            self.step = nn.MaxPool2d(steps[0], stride=1, padding=steps[0] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if not self.chain:
            return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))
        pooled = [x]
        for _ in self.poolings:
            pooled.append(self.step(pooled[-1]))
        return self.conv2(torch.cat(pooled, dim=1))
