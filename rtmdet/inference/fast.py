"""The fast torch path for inference: BatchNorm folded, channels_last, half precision and CUDA graphs.

A small detector at batch 1 is bound by kernel launches, not by the GPU's arithmetic (tiny@640:
about 7 ms eager against 1.2 ms with its launches replayed as one graph). `FastForward` wraps an
RTMDet for inference:

* BatchNorm folded into the convolutions (`rtmdet.models.fuse`), on a copy of the model;
* channels_last memory, and on CUDA fp32 (the default), fp16 or bf16 weights and activations;
* on CUDA, the whole forward (normalization included) captured once per batch size as a CUDA
  graph over a static input buffer and replayed: one launch per batch. A batch smaller than the
  largest seen is padded to it, so a run over a dataset replays one graph. The outputs come back
  as float32 copies, so they survive the next replay;
* optionally (`compile`), the folded model with its normalization compiled by TorchInductor
  first: "default" fuses each convolution's bias and activation, the additions and the
  concatenations into a few Triton kernels (eager cuDNN adds the bias and the SiLU as two more
  launches per convolution); "max-autotune" also benchmarks Triton and cuDNN kernels per
  convolution and keeps the fastest. Inductor's own CUDA graphs stay off: the compiled forward
  is captured in this module's graph like the eager one. Compiling takes 10-30 s ("default",
  tiny to x on an H200) to many minutes ("max-autotune": over 7 min for tiny, not finished).

On the CPU it is the folded, channels_last float32 model, eager (no graphs there). Outputs equal
the eager model's within float rounding (fp32) or half precision (tests/test_inference_fast.py).
Half precision is opt-in: on the e2e reference photo at its variant threshold (score 0.7), fp16 kept
108 detections where fp32 keeps 119 (scores near the threshold move).

Measured (benchmarks/deploy_speed.py, H200, torch 2.11, batch 1 at 640, model only, graph replay):
tiny 7.9 ms eager fp32; 1.25 ms as a graph in fp32 or fp16; 0.76 ms compiled ("default") in fp16.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from rtmdet.errors import ConfigError
from rtmdet.models.fuse import fuse_conv_bn

if TYPE_CHECKING:
    from rtmdet.models.detector import RTMDet

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COMPILE_MODES = ("off", "default", "max-autotune")
# torch.compile options per mode (no mode= beside them: torch takes one or the other).
_INDUCTOR = {"default": {"triton.cudagraphs": False},
             "max-autotune": {"triton.cudagraphs": False, "max_autotune": True, "conv_1x1_as_mm": True,
                              "coordinate_descent_tuning": True}}


def compile_model(model: torch.nn.Module, mode: str) -> Any:
    """`model` compiled by TorchInductor for inference in `mode` (see COMPILE_MODES; "off" returns
    it unchanged), static shapes, without Inductor's own CUDA graphs."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"fast inference compile mode {mode!r}: use {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return model
    return torch.compile(model, dynamic=False, fullgraph=True, options=_INDUCTOR[mode])


def capture_graph(fn: Any, *static_inputs: torch.Tensor) -> tuple["torch.cuda.CUDAGraph", Any]:
    """Record `fn(*static_inputs)` as a CUDA graph (two warm-up runs on a side stream first, as
    CUDA graphs need; they also trigger compilation). Returns the graph and its static outputs:
    refill the inputs in place, replay, read the outputs before the next replay."""
    device = static_inputs[0].device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static_inputs)
    return graph, outputs


class FastForward:
    """uint8 BGR [N, 3, S, S] -> the model's raw outputs as float32, the fast way (see module doc)."""

    def __init__(self, model: "RTMDet", device: str | torch.device, dtype: str = "fp32", graphs: bool = True,
                 compile: str = "off"):
        if dtype not in DTYPES:
            raise ConfigError(f"fast inference dtype {dtype!r}: use {', '.join(DTYPES)}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.dtype = DTYPES[dtype] if cuda else torch.float32
        net = fuse_conv_bn(model).to(self.device)
        self.model = net.to(memory_format=torch.channels_last, dtype=self.dtype).eval()
        self.forward = compile_model(_Inference(self.model, self.dtype), compile)
        self.graphs = graphs and cuda
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: torch.Tensor | None = None
        self._static_out: Any = None

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> Any:
        images_uint8 = images_uint8.to(self.device, non_blocking=True)
        if not self.graphs:
            return _to_float(self.forward(images_uint8), copy=False)
        n = images_uint8.shape[0]
        if self._static_in is None or n > self._static_in.shape[0] or images_uint8.shape[1:] != self._static_in.shape[1:]:
            self._capture(images_uint8.shape)
        self._static_in[:n].copy_(images_uint8)
        if n < self._static_in.shape[0]:
            self._static_in[n:].zero_()
        self._graph.replay()
        return _to_float(self._static_out, copy=True, rows=n)

    def _capture(self, shape: torch.Size) -> None:
        """Record the forward for inputs of `shape` (warm-up runs on a side stream first, as CUDA
        graphs need); an earlier graph is dropped."""
        self._graph = None
        self._static_in = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        self._graph, self._static_out = capture_graph(self.forward, self._static_in)
        log.debug("captured the inference forward for input %s as a CUDA graph", tuple(shape))


class _Inference(torch.nn.Module):
    """uint8 pixels in, the model's outputs out: normalization, cast and layout in one module, so
    that a compiled forward fuses them into its first kernels."""

    def __init__(self, model: "RTMDet", dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images_uint8: torch.Tensor) -> Any:
        x = self.model.normalize(images_uint8.float()).to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self.model(x)


def _to_float(outputs: Any, copy: bool, rows: int | None = None) -> Any:
    """The model's nested outputs (tensors, lists, tuples) as float32, cut to `rows` images; copies
    when asked (a graph's outputs are overwritten by the next replay)."""
    if isinstance(outputs, torch.Tensor):
        t = outputs if rows is None else outputs[:rows]
        return t.float().clone() if copy and t.dtype == torch.float32 else t.float()
    return type(outputs)(_to_float(o, copy, rows) for o in outputs)
