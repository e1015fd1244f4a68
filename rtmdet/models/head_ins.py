"""RTMDet-Ins's head (mmdetection's RTMDetInsSepBNHead): RTMDet's head, a kernel branch whose 169
numbers per point parameterize a small dynamic convolution, and a mask-feature module; the
dynamic convolution turns a point's kernel and the mask features into its instance mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtmdet.models.head import RTMDetSepBNHead
from rtmdet.models.layers import ConvModule

NUM_PROTOTYPES = 8
DYCONV_CHANNELS = 8
MASK_STRIDE = 8  # the mask features' stride (the finest neck level)
# The dynamic convolution: 1x1 convs 10 -> 8 -> 8 -> 1 (coordinates + prototypes in, a logit out).
WEIGHT_NUMS = ((NUM_PROTOTYPES + 2) * DYCONV_CHANNELS, DYCONV_CHANNELS * DYCONV_CHANNELS, DYCONV_CHANNELS)
BIAS_NUMS = (DYCONV_CHANNELS, DYCONV_CHANNELS, 1)
NUM_GEN_PARAMS = sum(WEIGHT_NUMS) + sum(BIAS_NUMS)  # 169


class MaskFeatModule(nn.Module):
    """cat[P3, P4 and P5 resized to P3] -> 1x1 fusion -> 4 ConvModules -> 1x1 to the prototypes."""

    def __init__(self, channels: int, num_levels: int = 3, stacked_convs: int = 4, act: str = "silu"):
        super().__init__()
        self.fusion_conv = nn.Conv2d(num_levels * channels, channels, 1)
        self.stacked_convs = nn.Sequential(*(ConvModule(channels, channels, 3, act=act) for _ in range(stacked_convs)))
        self.projection = nn.Conv2d(channels, NUM_PROTOTYPES, 1)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        fused = torch.cat([feats[0], *(F.interpolate(f, size=size, mode="bilinear") for f in feats[1:])], dim=1)
        return self.projection(self.stacked_convs(self.fusion_conv(fused)))


class RTMDetInsSepBNHead(RTMDetSepBNHead):
    """Per level: class logits, box distances relu(reg) x stride, and kernels [N, 169, H, W]; plus
    the mask features [N, 8, H/8, W/8]. As in mmdetection: the regression branch *is* the class
    branch (the same per-level modules, listed under both names), the kernel convs are not
    shared across levels, and there is no exp on the distances whatever the size."""

    def __init__(self, num_classes: int, channels: int, stacked_convs: int = 2, act: str = "silu",
                 exp_on_reg: bool = False, strides: tuple[int, ...] = (8, 16, 32)):
        super().__init__(num_classes, channels, stacked_convs, act, False, strides)
        self.mask_head = MaskFeatModule(channels, len(strides), 4, act)
        for m in self.mask_head.modules():  # init_weights ran before the mask head existed
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _reg_towers(self, channels: int, stacked_convs: int, act: str) -> nn.ModuleList:
        return nn.ModuleList(list(self.cls_convs))  # the same modules: reg_feat == cls_feat

    def _add_towers(self, channels: int, stacked_convs: int, act: str) -> None:
        self.kernel_convs = nn.ModuleList(self._tower(channels, stacked_convs, act) for _ in self.strides)

    def _add_predictors(self, channels: int) -> None:
        self.rtm_kernel = nn.ModuleList(nn.Conv2d(channels, NUM_GEN_PARAMS, 1) for _ in self.strides)

    def distances(self, lvl: int, reg_feat: torch.Tensor) -> torch.Tensor:
        return F.relu(self.rtm_reg[lvl](reg_feat)) * self.strides[lvl]

    def forward(self, feats: tuple[torch.Tensor, ...]):
        mask_feat = self.mask_head(feats)
        cls_scores, bbox_preds, kernel_preds = [], [], []
        for lvl, x in enumerate(feats):
            cls_feat, reg_feat = self.branches(lvl, x)
            kernel_feat = x
            for layer in self.kernel_convs[lvl]:
                kernel_feat = layer(kernel_feat)
            cls_scores.append(self.rtm_cls[lvl](cls_feat))
            bbox_preds.append(self.distances(lvl, reg_feat))
            kernel_preds.append(self.rtm_kernel[lvl](kernel_feat))
        return cls_scores, bbox_preds, kernel_preds, mask_feat


def dynamic_mask_logits(mask_feat: torch.Tensor, kernels: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Instance mask logits [K, H, W] at the mask features' stride, from one image's mask features
    [8, H, W] (or each instance's own [K, 8, H, W]: a batch's instances in one call), K kernels
    [K, 169] and their priors [K, 4] = (x, y, stride, stride).

    Each instance sees its relative coordinates ((prior - pixel) / (8 x its own stride), x then y)
    beside the prototypes, through three 1x1 convs (ReLU between, none after). mmdetection runs
    them as one grouped convolution with K groups; here each is a batched matrix product
    (baddbmm), the same sums without a new cuDNN plan for every instance count K (on the GPU
    each new K cost a plan search: 98 s of a 100-epoch run's first epoch, 8-14 s per validation)."""
    k = kernels.shape[0]
    h, w = mask_feat.shape[-2:]
    if k == 0:
        return mask_feat.new_zeros((0, h, w))
    ys = torch.arange(h, device=mask_feat.device, dtype=mask_feat.dtype) * MASK_STRIDE
    xs = torch.arange(w, device=mask_feat.device, dtype=mask_feat.dtype) * MASK_STRIDE
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    scale = (priors[:, 2] * MASK_STRIDE)[:, None, None]
    rel = torch.stack([(priors[:, 0, None, None] - gx) / scale, (priors[:, 1, None, None] - gy) / scale], 1)
    feats = mask_feat if mask_feat.dim() == 4 else mask_feat[None].expand(k, -1, -1, -1)
    x = torch.cat([rel, feats], 1).reshape(k, -1, h * w)  # [K, 10, H*W]
    params = kernels.split([*WEIGHT_NUMS, *BIAS_NUMS], dim=1)
    weights, biases = params[:3], params[3:]
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        cout = bias.shape[1]
        x = torch.baddbmm(bias[:, :, None], weight.reshape(k, cout, -1), x)  # [K, cout, H*W]
        if i < 2:
            x = F.relu(x)
    return x.reshape(k, h, w)
