"""Image in, detections out, on the GPU: letterbox, model, candidate selection and NMS in one CUDA graph.

`GpuPipeline` takes a photo that is already a uint8 HxWx3 BGR tensor on the GPU (a decoder's or a
camera's output) and returns its final boxes, scores and labels on the GPU. Per call:

1. the photo is copied into a static buffer of its size;
2. one CUDA graph replay (graphs are captured per photo size, at its first photo): the letterbox
   (`letterbox_tensor`: OpenCV's bilinear resize keeping the aspect ratio, bit for bit, then pad 114
   bottom/right), normalization, the fast model (rtmdet.inference.fast: BatchNorm folded,
   channels_last, fp32/fp16/bf16, optionally Inductor-compiled), the fixed-shape selection of the
   first K candidates (rtmdet.inference.postprocess_static steps 1-2; K = 8 x max_per_img, at
   least 256) and their class-aware greedy NMS with fixed shapes (`nms_in_graph`);
3. one read of the kept count (the one place where the host waits), then the kept rows. Should
   those K not settle the photo (fewer than max_per_img kept while more candidates wait), a second
   graph over the same head outputs selects and suppresses the eager path's K (4,096 by default)
   instead; should the in-graph NMS still not be exact (very long chains of suppression, or more
   candidates than that K that it does not settle), torchvision's NMS or the eager post-process
   gives the photo's answer.

The NMS's pairwise work grows as K squared (H200, tiny fp16: 0.31 ms for the selection and NMS at
K = 4,096, 0.10 at 1,024), which is why the first graph looks at few candidates.

The canvas equals `rtmdet.inference.preprocess.letterbox`'s byte for byte and the result is
`postprocess_batch_static`'s (= the eager post-process's) on it, so in fp32 the detections are
`Detector`'s up to float rounding in the convolutions.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from rtmdet.errors import DataError
from rtmdet.inference.fast import FastForward, capture_graph
from rtmdet.inference.postprocess import PostprocessConfig, postprocess_batch, preselection
from rtmdet.inference.postprocess_static import Result, finish_image, nms_in_graph, select_candidates
from rtmdet.inference.preprocess import PAD_VALUE, LetterboxInfo, rescale_size

if TYPE_CHECKING:
    from rtmdet.models.detector import RTMDet


def letterbox_tensor(image: torch.Tensor, size: int, out: torch.Tensor | None = None,
                     pad_value: int = PAD_VALUE) -> tuple[torch.Tensor, LetterboxInfo]:
    """`rtmdet.inference.preprocess.letterbox` for a uint8 HxWx3 tensor on any device: the
    [1, 3, size, size] uint8 canvas (written into `out` when given) and how the photo maps onto it.
    The resize is OpenCV's INTER_LINEAR for uint8, bit for bit (see `resize_linear`)."""
    check_photo(image)
    h, w = image.shape[:2]
    new_w, new_h, _ = rescale_size(w, h, size)
    canvas = out if out is not None else torch.empty((1, 3, size, size), dtype=torch.uint8, device=image.device)
    resized = image if (new_w, new_h) == (w, h) else resize_linear(image, new_w, new_h)
    canvas[0, :, :new_h, :new_w].copy_(resized.permute(2, 0, 1))
    canvas[:, :, new_h:, :].fill_(pad_value)
    canvas[:, :, :new_h, new_w:].fill_(pad_value)
    return canvas, LetterboxInfo(ori_hw=(h, w), resized_hw=(new_h, new_w), scale_wh=(new_w / w, new_h / h))


def check_photo(image: torch.Tensor) -> None:
    """One line for a tensor that is not a uint8 HxWx3 photo."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"image tensor of shape {tuple(image.shape)} and dtype {image.dtype}: expected HxWx3 uint8 BGR")


def resize_linear(image: torch.Tensor, new_w: int, new_h: int) -> torch.Tensor:
    """cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR) of a uint8 HxWxC tensor,
    the same integers on any device: OpenCV's fixed-point bilinear (11-bit weights per axis), a
    horizontal pass per source row, then a vertical pass with its rounding, (((r0 >> 4) * b0) >> 16
    + ((r1 >> 4) * b1) >> 16 + 2) >> 2. Columns past the edge take the edge pixel with weight 1;
    rows past it take the edge row with the unclipped weights (as OpenCV does)."""
    h, w = image.shape[:2]
    x0, x1, a0, a1 = _taps(w, new_w, True, str(image.device))
    y0, y1, b0, b1 = _taps(h, new_h, False, str(image.device))
    src = image.int()
    rows = src[:, x0] * a0[:, None] + src[:, x1] * a1[:, None]  # [H, new_w, C], pixel x 2048
    top = ((rows[y0] >> 4) * b0[:, None, None]) >> 16
    bottom = ((rows[y1] >> 4) * b1[:, None, None]) >> 16
    return ((top + bottom + 2) >> 2).clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=32)
def _taps(src: int, dst: int, clip_weights: bool, device: str) -> tuple[torch.Tensor, ...]:
    """Per output pixel of one axis: the two source indices and their 11-bit weights, as OpenCV's
    resize computes them (float32 offsets from a float64 scale, weights rounded one by one)."""
    f = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).float()
    i = torch.floor(f)
    f = f - i
    i = i.long()
    if clip_weights:  # columns: past an edge, the edge pixel alone
        f = torch.where((i < 0) | (i >= src - 1), torch.zeros_like(f), f)
    w0 = torch.round((1 - f) * 2048).int()
    w1 = torch.round(f * 2048).int()
    taps = (i.clamp(0, src - 1), (i + 1).clamp(0, src - 1), w0, w1)
    return tuple(t.to(device) for t in taps)


class GpuPipeline:
    """A box RTMDet as one image-in, detections-out call on a CUDA device (module docstring); on
    the CPU it runs the same steps without a graph.

    dtype: fp32, fp16 or bf16 weights and activations; compile: rtmdet.inference.fast's modes
    (off, default, max-autotune). Graphs are captured (and the model compiled, when asked) at the
    first photo of each size, and kept with their buffers for the last `max_graphs` sizes: time it
    from the second.
    first_k: how many candidates the first graph's NMS looks at (default 8 x max_per_img, at least
    256: the eager path's preselection without its 4,096 floor); the NMS's pairwise work grows as
    its square, so a small first K is what makes the call fast.
    When those do not settle the photo (fewer than max_per_img kept while more candidates wait),
    a second graph over the same head outputs does it again with the eager path's preselection
    (max(PRESELECT, 8 x max_per_img)), then the eager post-process if even that does not settle it.
    nms_passes: rounds of the in-graph greedy NMS (nms_in_graph) before its exactness check."""

    def __init__(self, model: "RTMDet", device: str | torch.device = "cuda", dtype: str = "fp16",
                 compile: str = "off", postprocess: PostprocessConfig = PostprocessConfig(), max_graphs: int = 8,
                 nms_passes: int = 12, first_k: int | None = None):
        if model.cfg.task != "detect":
            raise DataError(f"GpuPipeline runs box models (task detect), not {model.cfg.task}")
        self.device = torch.device(device)
        self.fast = FastForward(model, self.device, dtype, graphs=False, compile=compile)
        self.cfg = postprocess
        full_k = preselection(postprocess)
        self.ks = (min(full_k, first_k or max(256, 8 * postprocess.max_per_img)), full_k)
        # The selection and NMS are elementwise work over [K, K] pairs: compiled, it fuses into a
        # few kernels. One compiled function per K, so that neither recompiles for the other.
        self._posts = [self._post_fn(k, compile) for k in dict.fromkeys(self.ks)]
        self.strides = tuple(model.strides)
        self.size = model.cfg.image_size
        self.max_graphs = max_graphs
        self.nms_passes = nms_passes
        self.classes = [f"class_{i}" for i in range(model.cfg.num_classes)]
        self._graphs: OrderedDict[tuple[int, int], _Captured] = OrderedDict()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cuda", dtype: str = "fp16",
                        compile: str = "off", first_k: int | None = None, **postprocess) -> "GpuPipeline":
        """A pipeline over a box model's checkpoint; postprocess: PostprocessConfig's fields
        (score_thr, iou_thr, max_per_img, ...). The class names are `class_names_of` the checkpoint."""
        from rtmdet.models.checkpoint import class_names_of, load_model

        model, ckpt = load_model(path, "cpu")
        pipeline = cls(model, device, dtype, compile, PostprocessConfig(**postprocess), first_k=first_k)
        pipeline.classes = class_names_of(ckpt, model.cfg.num_classes)
        return pipeline

    def _post_fn(self, k: int, compile: str) -> Callable[..., tuple]:
        def select_and_nms(cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor], inv_scale: torch.Tensor,
                           ori_hw: torch.Tensor) -> tuple:
            found = select_candidates(cls_scores, bbox_preds, self.strides, (self.size, self.size), inv_scale,
                                      self.cfg, k=k)
            final = nms_in_graph(found, ori_hw, self.cfg, self.nms_passes)
            return found, final, torch.stack([final.count[0], final.exact[0].long()])

        return select_and_nms if compile == "off" else torch.compile(select_and_nms, dynamic=False, fullgraph=True)

    def _first(self, photo: torch.Tensor, canvas: torch.Tensor, inv_scale: torch.Tensor, ori_hw: torch.Tensor) -> tuple:
        """Letterbox, model, selection and NMS of the first K: (head outputs, (found, final, stats))."""
        letterbox_tensor(photo, self.size, out=canvas)
        cls_scores, bbox_preds = self.fast.forward(canvas)[:2]
        return cls_scores, bbox_preds, self._posts[0](cls_scores, bbox_preds, inv_scale, ori_hw)

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> Result:
        """uint8 HxWx3 BGR -> boxes [K, 4] (photo pixels, xyxy), scores [K], labels [K] on the device."""
        check_photo(image)
        image = image.to(self.device, non_blocking=True)
        h, w = image.shape[:2]
        run = self._graphs.get((h, w))
        if run is None:
            run = self._prepare(h, w)
        else:
            self._graphs.move_to_end((h, w))
        if run.graphs:
            run.photo.copy_(image)
            run.graphs[0].replay()
        else:  # the CPU: the steps themselves
            run.outputs[0] = self._first(image, run.canvas, run.inv_scale, run.ori_hw)
        cls_scores, bbox_preds, (found, final, stats) = run.outputs[0]
        for stage, post in enumerate(self._posts):
            if stage:  # the first K did not settle the photo: the next stage's K, same head outputs
                if run.graphs:
                    run.graphs[stage].replay()
                else:
                    run.outputs[stage] = post(cls_scores, bbox_preds, run.inv_scale, run.ori_hw)
                found, final, stats = run.outputs[stage]
            count, exact = stats.tolist()  # the one wait for the GPU (per stage)
            if exact:  # copies: the next replay overwrites the graph's outputs
                return final.boxes[0, :count].clone(), final.scores[0, :count].clone(), final.labels[0, :count].clone()

        def eager_result() -> Result:
            return postprocess_batch([c.float() for c in cls_scores], [r.float() for r in bbox_preds], self.strides,
                                     (self.size, self.size), [run.info.scale_wh], [run.info.ori_hw], self.cfg)[0]

        return finish_image(found, 0, run.info.ori_hw, self.cfg, eager_result)

    def _prepare(self, h: int, w: int) -> "_Captured":
        photo = torch.zeros((h, w, 3), dtype=torch.uint8, device=self.device)
        canvas = torch.empty((1, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        _, info = letterbox_tensor(photo, self.size, out=canvas)
        sw, sh = info.scale_wh
        inv_scale = torch.tensor([[1 / sw, 1 / sh, 1 / sw, 1 / sh]], dtype=torch.float32, device=self.device)
        ori_hw = torch.tensor([[h, w]], dtype=torch.float32, device=self.device)
        run = _Captured(photo, canvas, inv_scale, ori_hw, info, outputs=[None] * len(self._posts))
        if self.device.type == "cuda":
            graph, run.outputs[0] = capture_graph(self._first, photo, canvas, inv_scale, ori_hw)
            run.graphs.append(graph)
            cls_scores, bbox_preds = run.outputs[0][:2]
            levels = len(cls_scores)
            for stage, post in enumerate(self._posts[1:], start=1):  # over the first graph's head outputs
                graph, run.outputs[stage] = capture_graph(
                    lambda *t, post=post: post(list(t[:levels]), list(t[levels:-2]), t[-2], t[-1]),
                    *cls_scores, *bbox_preds, inv_scale, ori_hw)
                run.graphs.append(graph)
        self._graphs[(h, w)] = run
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return run


@dataclass
class _Captured:
    """One photo size's static buffers and, on CUDA, its graphs (one per NMS stage) and their outputs."""

    photo: torch.Tensor
    canvas: torch.Tensor
    inv_scale: torch.Tensor
    ori_hw: torch.Tensor
    info: LetterboxInfo
    graphs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
