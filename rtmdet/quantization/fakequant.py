"""Fake-quant modules that mirror TFLite's int8 scheme, as onnx2tf + TF's converter produce it.

* Weights: per output channel, symmetric, int8 in [-127, 127] (scale = max|w| / 127).
* Activations: per tensor, asymmetric int8 in [-128, 127]; the range always holds 0, and the
  scale and zero point are nudged exactly as the converter does (see `qparams`).
* Ranges are min/max over calibration images, never moving averages: TF's calibrator records
  the global min/max of each tensor over its representative dataset, so the same images give
  the same scales here and in the .tflite. An `ActQuant` changes its range only inside an
  explicit `calibrating(...)` pass: never in a training step, never in evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from rtmdet.models.layers import ChannelAttention, ConvModule

QMIN, QMAX = -128, 127  # int8 activations
WMAX = 127  # int8 weights, narrow range [-127, 127]
_EPS = 1e-12


def qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TFLite's (scale, zero_point) of an int8 range, as the converter computes them (MLIR's
    getNudgedScaleAndZeroPoint): range extended to hold 0, in double precision, zero point
    rounded half away from zero (std::round) and clamped to [-128, 127]."""
    lo, hi = torch.clamp(lo.double(), max=0.0), torch.clamp(hi.double(), min=0.0)
    scale = torch.clamp((hi - lo) / (QMAX - QMIN), min=_EPS)
    zp = QMIN - lo / scale
    zp = torch.clamp(torch.sign(zp) * torch.floor(zp.abs() + 0.5), QMIN, QMAX)
    return scale.float().reshape(1), zp.to(torch.int32).reshape(1)


def fake_quant_weight(w: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake-quant of a conv weight (straight-through gradient)."""
    if not enabled:
        return w
    scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / WMAX).clamp_min(_EPS).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WMAX, WMAX)


class ActQuant(nn.Module):
    """Per-tensor asymmetric int8 fake-quant of an activation; range from calibration only.

    `fixed` = (scale, zero_point) pins TFLite's fixed output parameters (LOGISTIC: 1/256, -128).
    Until calibrated (or when disabled) it passes values through unchanged. The range
    (`lo`, `hi`) is saved; scale and zero point are derived from it whenever it is set
    (`refresh`), never per forward, so a forward pass reads no value back from the device.
    """

    def __init__(self, fixed: tuple[float, int] | None = None):
        super().__init__()
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.ones(1), persistent=False)
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32), persistent=False)
        self.fixed = fixed
        self.calibrating = False
        self.enabled = True
        self.ready = False
        self.refresh()

    def reset(self) -> None:
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))
        self.refresh()

    def set_range(self, lo: float | torch.Tensor, hi: float | torch.Tensor) -> None:
        self.lo.copy_(torch.as_tensor(lo))
        self.hi.copy_(torch.as_tensor(hi))
        self.refresh()

    def refresh(self) -> None:
        """Derive scale and zero point from the range (or the fixed parameters)."""
        if self.fixed is not None:
            self.scale.fill_(self.fixed[0])
            self.zero_point.fill_(self.fixed[1])
            self.ready = True
            return
        self.ready = bool(torch.isfinite(self.lo)) and bool(torch.isfinite(self.hi))
        if self.ready:
            scale, zero_point = qparams(self.lo, self.hi)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero_point) this quantizer applies."""
        return self.scale, self.zero_point

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            with torch.no_grad():
                self.lo.copy_(torch.minimum(self.lo, x.detach().min().float()))
                self.hi.copy_(torch.maximum(self.hi, x.detach().max().float()))
            return x
        if not self.enabled or not self.ready:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, QMIN, QMAX)

    def extra_repr(self) -> str:
        if self.fixed is not None:
            return f"fixed scale={self.fixed[0]:.6g} zero_point={self.fixed[1]}"
        return f"range=[{float(self.lo):.4g}, {float(self.hi):.4g}]"


class QConvModule(nn.Module):
    """A BN-folded ConvModule as TFLite runs it: int8 per-channel weights, the activation fused
    into the conv (ReLU/ReLU6: one quantizer after it), or, for SiLU, the conv output, the
    LOGISTIC (fixed 1/256 scale) and the MUL each quantized. Keeps ConvModule's `conv` and
    `activate` names so the float weights keep their state-dict keys."""

    def __init__(self, module: ConvModule):
        super().__init__()
        if not isinstance(module.bn, nn.Identity):
            raise ValueError("QConvModule needs a BN-folded ConvModule (rtmdet.models.fuse.fuse_conv_bn)")
        self.conv = module.conv
        self.activate = module.activate
        self.silu = isinstance(module.activate, nn.SiLU)
        if self.silu:
            self.q_pre = ActQuant()
            self.q_sigmoid = ActQuant(fixed=(1.0 / 256.0, -128))
        self.q = ActQuant()
        self.quantize_weights = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        w = fake_quant_weight(c.weight, self.quantize_weights)
        y = F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)
        if self.silu:
            y = self.q_pre(y)
            return self.q(y * self.q_sigmoid(torch.sigmoid(y)))
        return self.q(self.activate(y))


class QConv2d(nn.Conv2d):
    """A plain conv (the head's predictors): int8 per-channel weights, its output quantized."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "QConv2d":
        """A QConv2d holding `conv`'s own Parameter objects (no copy of the weights)."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        q.weight, q.bias = conv.weight, conv.bias
        q.q = ActQuant()
        q.quantize_weights = True
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(self._conv_forward(x, fake_quant_weight(self.weight, self.quantize_weights), self.bias))


class QChannelAttention(nn.Module):
    """Channel attention as TF's converter writes it (read from a tiny classifier's int8 file):
    MEAN (int8), CONV_2D with Hardsigmoid's linear part x / 6 + 1/2 folded into its weights and
    bias (int8, its own calibrated range, before the clip), RELU_0_TO_1 (fixed scale 1/255, zero
    point -128), then the MUL by the input (int8)."""

    def __init__(self, module: ChannelAttention):
        super().__init__()
        if not isinstance(module.act, nn.Hardsigmoid):
            raise ValueError(f"QChannelAttention simulates a Hardsigmoid gate, not {type(module.act).__name__}")
        self.global_avgpool = module.global_avgpool
        self.fc = module.fc
        self.q_pool, self.q_fc, self.q = ActQuant(), ActQuant(), ActQuant()
        self.q_gate = ActQuant(fixed=(1.0 / 255.0, -128))
        self.quantize_weights = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.q_pool(self.global_avgpool(x))
        w = fake_quant_weight(self.fc.weight, self.quantize_weights)
        linear = self.q_fc(F.conv2d(pooled, w, self.fc.bias) / 6.0 + 0.5)  # Hardsigmoid = clip(x / 6 + 1/2, 0, 1)
        return self.q(x * self.q_gate(linear.clamp(0.0, 1.0)))


def quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuant]]:
    """Every ActQuant of a model with its qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, ActQuant):
            yield name, m


@contextlib.contextmanager
def calibrating(model: nn.Module, reset: bool = True) -> Iterator[None]:
    """Record activation ranges on the float model, as TF's calibrator does (float weights too:
    int8 weights shift ranges by ~0.5%, measured), in eval mode without gradients."""
    qs = [q for _, q in quantizers(model)]
    convs = {m: m.quantize_weights for m in model.modules() if hasattr(m, "quantize_weights")}
    was_training = model.training
    if reset:
        for q in qs:
            q.reset()
    for m in qs:
        m.calibrating = True
    for m in convs:
        m.quantize_weights = False
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m in qs:
            m.calibrating = False
            m.refresh()
        for m, previous in convs.items():
            m.quantize_weights = previous
        model.train(was_training)


def set_fake_quant(model: nn.Module, enabled: bool, weights: bool | None = None) -> None:
    """Turn activation fake-quant on or off; weight fake-quant too when `weights` is given."""
    for _, q in quantizers(model):
        q.enabled = enabled
    if weights is not None:
        for m in model.modules():
            if hasattr(m, "quantize_weights"):
                m.quantize_weights = weights
