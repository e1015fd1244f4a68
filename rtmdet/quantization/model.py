"""The fake-quant detector: a BN-folded RTMDet traced with torch.fx, quantized where TFLite is.

Where the quantizers go, and why (what onnx2tf 2.6.9 + TF's converter make of our graph,
read from the .tflite files; see rtmdet.quantization.inspect):

* the float input (QUANTIZE: raw pixels 0..255, scale 1 when calibration spans 0..255) and the
  normalization, one op in the export (a MUL by 1/255 for nano, a per-channel 1x1 conv for
  mean/std: rtmdet.export.onnx.input_normalization), its own int8 output;
* after every conv + BN + activation (BN folded, ReLU/ReLU6 fused into the conv: one tensor),
  the head's class and box predictors (outputs: class logits, not sigmoid scores, and box
  distances before the stride multiply, which the export folds away), every residual add,
  and every concat;
* some tensors take the range of the op they feed ("ties", see `_tied_ranges`): a concat's
  direct inputs, and the conv output that feeds only a residual add. Max-pool and nearest
  upsample keep their input's scale (no quantizer); an upsampled input of a concat is
  requantized to the concat's scale, which the concat's own quantizer reproduces;
* ranges are min/max over the calibration images of the float model (float weights too).

Checked tensor by tensor (`match_scales`): on the nano (ReLU6, no channel attention, x/255)
every one of its 108 scales and zero points equals the .tflite's. So do all 190 of the SiLU
nano and 187 of 188 of the tiny (SiLU, channel attention, mean/std input) QAT-trained on
facemask; the odd one was a channel-attention gate, simulated then as one quantized Hardsigmoid
output where the file has the pre-clip conv output and a fixed-scale RELU_0_TO_1
(QChannelAttention now does as the file does). The neck's reduced maps feed two concats (one
through an upsample) and the file gives them one concat's scale: the bottom-up one's in those
models (as `_tied_ranges` does), the top-down one's in a random 64 px SiLU model (off by 1-24%),
by no rule we found.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from rtmdet.models.detector import RTMDet
from rtmdet.models.fuse import fuse_conv_bn
from rtmdet.models.layers import ChannelAttention, ConvModule
from rtmdet.quantization.fakequant import (
    ActQuant,
    QChannelAttention,
    QConv2d,
    QConvModule,
    calibrating,
    quantizers,
)

_SAME_SCALE_MODULES = (nn.MaxPool2d,)
_SAME_SCALE_FUNCTIONS = (F.interpolate,)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ConvModule, ChannelAttention)) or super().is_leaf_module(m, qualname)


class QATModel(nn.Module):
    """A traced, BN-folded model with TFLite's int8 simulated: quantized input and normalization,
    then `net`. Subclasses say what the model is (QATDetector; the classifier's in
    rtmdet.quantization.classify)."""

    def __init__(self, net: fx.GraphModule, cfg, mean: torch.Tensor, std: torch.Tensor, ties: dict[str, str]):
        super().__init__()
        self.cfg = cfg
        self.q_input = ActQuant()  # the int8 file's QUANTIZE of the float pixels
        self.q_norm = ActQuant()  # the normalization op's int8 output
        self.net = net
        self.ties = dict(ties)  # quantizer -> the quantizer whose range it uses (concat inputs)
        self.register_buffer("mean", mean.clone(), persistent=False)  # in the input's channel order
        self.register_buffer("std", std.clone(), persistent=False)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] BGR pixels (0..255) -> the quantized, normalized input of forward."""
        return self.q_norm((self.q_input(images_uint8.float()) - self.mean) / self.std)

    def forward(self, images: torch.Tensor):
        return self.net(images)

    def apply_ties(self) -> None:
        """Give every tied quantizer the range of the concat it feeds."""
        named = dict(quantizers(self))
        for name, source in self.ties.items():
            named[name].set_range(named[source].lo, named[source].hi)

    def ranges(self) -> dict[str, list[float]]:
        """Every quantizer's calibrated [min, max] by name (fixed-scale quantizers left out)."""
        return {name: [float(q.lo), float(q.hi)] for name, q in quantizers(self) if q.fixed is None}

    def load_ranges(self, ranges: dict[str, Sequence[float]]) -> None:
        """Set ranges saved by `ranges()`; the names must be exactly this model's."""
        named = {n: q for n, q in quantizers(self) if q.fixed is None}
        if set(ranges) != set(named):
            missing, extra = sorted(set(named) - set(ranges)), sorted(set(ranges) - set(named))
            raise ValueError(f"quantizer ranges do not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, (lo, hi) in ranges.items():
            named[name].set_range(float(lo), float(hi))

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The BN-folded float weights under RTMDet's keys (fake-quant stripped)."""
        qnames = [n for n, _ in quantizers(self.net)]
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.net.state_dict().items()
                if not any(k.startswith(q + ".") for q in qnames)}


class QATDetector(QATModel):
    """An RTMDet with TFLite's int8 simulated; `normalize` and `forward` behave like RTMDet's,
    so the trainer's step, `TorchBackend` and `Detector` take it as they take the float model.
    forward: per level, class logits [N, C, H/s, W/s] and distances in pixels, fake-quantized."""

    def __init__(self, net: fx.GraphModule, model: RTMDet, ties: dict[str, str]):
        super().__init__(net, model.cfg, model.mean, model.std, ties)
        self.strides = model.strides


def prepare_qat(model: RTMDet) -> QATDetector:
    """Fold BN (a copy of `model`), trace it and insert TFLite's quantizers."""
    folded = fuse_conv_bn(model)
    net, ties = quantized_graph(folded)
    return QATDetector(net, folded, ties).train(model.training)


def quantized_graph(folded: nn.Module, extra: Callable[[fx.Node], bool] = lambda node: False
                    ) -> tuple[fx.GraphModule, dict[str, str]]:
    """A BN-folded model traced, TFLite's quantizers in place, and its tied ranges (names under
    `net.`). `extra(node)`: further nodes whose output gets a quantizer of its own (a task's
    ops that the detector has not, e.g. the classifier's pooling and fully connected layer)."""
    graph = _Tracer().trace(folded)
    net = fx.GraphModule(folded, graph)
    producer: dict[fx.Node, str] = {}  # node -> the quantizer that sets its scale
    for node in list(graph.nodes):
        if node.op == "call_module" and (name := _quantize_module(net, node)):
            producer[node] = name
        elif (node.op == "call_function" and _needs_quantizer(node)) or extra(node):
            producer[node] = _insert_quantizer(net, graph, node)
    ties = _tied_ranges(graph, producer)
    graph.lint()
    net.recompile()
    return net, {f"net.{k}": f"net.{v}" for k, v in ties.items()}


def _quantize_module(net: fx.GraphModule, node: fx.Node) -> str | None:
    module = net.get_submodule(node.target)
    if isinstance(module, ConvModule):
        new: nn.Module = QConvModule(module)
    elif isinstance(module, ChannelAttention):
        new = QChannelAttention(module)
    elif type(module) is nn.Conv2d:
        new = QConv2d.from_conv(module)
    else:
        return None
    parent, _, leaf = node.target.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)
    return f"{node.target}.q"


def _needs_quantizer(node: fx.Node) -> bool:
    if node.target is torch.cat:
        return True
    # Residual adds of two tensors (a multiply by the stride is a constant, exported as 1).
    return node.target in (operator.add, torch.add) and all(isinstance(a, fx.Node) for a in node.args[:2])


def _insert_quantizer(net: fx.GraphModule, graph: fx.Graph, node: fx.Node) -> str:
    name = f"q_{node.name}"
    net.add_submodule(name, ActQuant())
    with graph.inserting_after(node):
        q = graph.call_module(name, (node,))
    node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    return name


def _tied_ranges(graph: fx.Graph, producer: dict[fx.Node, str]) -> dict[str, str]:
    """Quantizer -> the quantizer whose range it takes, chains resolved.

    What the converter does (read from the .tflite files of the nano): a concat's inputs are
    produced at the concat's scale, also a tensor with other users (the neck's reduced maps
    feed a concat and an upsample: the upsample path is requantized instead); an input that
    reaches the concat through a max-pool or upsample is tied only when nothing else uses it.
    A residual add's input that feeds nothing else (the conv before the add) is produced at
    the add's output scale; an input with other users keeps its own.
    """
    quant_of = {n: n.target for n in graph.nodes if n.op == "call_module" and str(n.target).startswith("q_")}
    ties = {}
    for node in graph.nodes:
        if node not in producer or node.op != "call_function":
            continue
        concat = node.target is torch.cat
        for arg in node.args[0] if concat else node.args[:2]:
            source = _source_quantizer(arg, producer, quant_of, direct_any_use=concat)
            if source is not None:
                ties[source] = producer[node]

    def root(name: str) -> str:
        while name in ties:
            name = ties[name]
        return name

    return {name: root(name) for name in ties}


def _source_quantizer(node: fx.Node, producer: dict[fx.Node, str], quant_of: dict,
                      direct_any_use: bool) -> str | None:
    """The quantizer that produces `node`: directly (whatever its users, if direct_any_use), or
    through max-pools/upsamples when every tensor on the way has a single user."""
    first = True
    while True:
        quantizer = quant_of.get(node) or producer.get(node)
        if quantizer is not None:
            return quantizer if (first and direct_any_use) or len(node.users) == 1 else None
        if len(node.users) != 1:
            return None
        same_scale = (node.op == "call_function" and node.target in _SAME_SCALE_FUNCTIONS) or (
            node.op == "call_module"
            and isinstance(node.graph.owning_module.get_submodule(node.target), _SAME_SCALE_MODULES))
        if not same_scale or not isinstance(node.args[0], fx.Node):
            return None
        node, first = node.args[0], False


def calibrate(model: QATModel, images_nhwc: np.ndarray, batch_size: int = 16) -> None:
    """Set every activation range to its min/max over the images, as TF's converter does:
    [n, S, S, 3] float BGR 0..255 letterboxed canvases (rtmdet.export.tflite.load_calibration)."""
    device = next(model.parameters()).device
    with calibrating(model):
        for i in range(0, len(images_nhwc), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images_nhwc[i : i + batch_size])).permute(0, 3, 1, 2)
            model(model.normalize(x.to(device)))
    model.apply_ties()


def to_float_model(model: QATDetector) -> RTMDet:
    """The BN-folded float RTMDet with the QAT weights: what the int8 export converts."""
    folded = fuse_conv_bn(RTMDet(model.cfg))
    folded.load_state_dict(with_aliases(model.float_state_dict(), folded), strict=True)
    return folded.eval()


def with_aliases(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` plus every key of `model` that names a tensor it already holds under another key.
    A traced model lists a shared module once: RTMDet-Ins's reg_convs are its cls_convs (the same
    modules under two names, as in mmdetection), and the trace keeps only the first name."""
    names: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(key)
    out = dict(state)
    for keys in names.values():
        known = next((k for k in keys if k in state), None)
        if known is not None:
            for key in keys:
                out.setdefault(key, state[known])
    return out
