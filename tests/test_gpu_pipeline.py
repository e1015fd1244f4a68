"""Image in, detections out on a device (rtmdet.inference.gpu): OpenCV's letterbox bit for bit on
tensors, the in-graph NMS against the eager post-process, and the pipeline against Detector."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from rtmdet.errors import DataError
from rtmdet.inference import Detector
from rtmdet.inference.gpu import GpuPipeline, letterbox_tensor
from rtmdet.inference.postprocess import PostprocessConfig, postprocess_batch
from rtmdet.inference.postprocess_static import nms_in_graph, select_candidates
from rtmdet.inference.preprocess import letterbox
from torchvision.ops import batched_nms
from test_postprocess import STRIDES, _maps
from test_postprocess_static import CASES

# (width, height, target): upscale, downscale, exactly 2x, extreme ratios, 1 pixel, no resize
SIZES = [(400, 226, 640), (1280, 960, 640), (1920, 1080, 640), (4000, 3000, 320), (2000, 37, 640), (37, 2000, 192),
         (1, 1, 64), (3, 5, 640), (640, 480, 640), (301, 400, 192), (999, 1001, 320)]


@pytest.mark.parametrize("w,h,target", SIZES)
def test_letterbox_tensor_is_opencvs_byte_for_byte(w, h, target):
    image = np.random.default_rng(w * h + target).integers(0, 256, (h, w, 3), dtype=np.uint8)
    want, want_info = letterbox(image, target)
    got, info = letterbox_tensor(torch.from_numpy(image), target)
    assert got.shape == (1, 3, target, target) and got.dtype == torch.uint8
    assert np.array_equal(got[0].permute(1, 2, 0).numpy(), want)
    assert info == want_info


def test_letterbox_tensor_on_real_photos(facemask):
    photos = sorted((facemask / "valid").glob("*.jpg"))[:6]
    assert photos
    for photo in photos:
        image = cv2.imread(str(photo))
        for target in (640, 192):
            got, _ = letterbox_tensor(torch.from_numpy(image), target)
            assert np.array_equal(got[0].permute(1, 2, 0).numpy(), letterbox(image, target)[0]), photo.name


def test_letterbox_tensor_refuses_what_is_not_a_bgr_photo():
    with pytest.raises(DataError, match=r"image tensor of shape \(4, 4\) and dtype torch.uint8: expected HxWx3"):
        letterbox_tensor(torch.zeros(4, 4, dtype=torch.uint8), 64)
    with pytest.raises(DataError, match="dtype torch.float32"):
        letterbox_tensor(torch.zeros(4, 4, 3), 64)


def _candidates(classes: int, size: int, cfg: PostprocessConfig, seed: int):
    cls, reg = _maps(3, classes, size, seed=seed)
    scale = [(0.5, 0.5), (1.0, 0.8), (2.0, 2.0)]
    ori = [(size * 2, size * 2), (int(size * 1.25), size), (size // 2, size // 2)]
    inv = torch.tensor([[1 / sw, 1 / sh] * 2 for sw, sh in scale])
    found = select_candidates(cls, reg, STRIDES, (size, size), inv, cfg)
    want = postprocess_batch(cls, reg, STRIDES, (size, size), scale, ori, cfg)
    return found, torch.tensor(ori, dtype=torch.float32), want


# 5 classes at 128 px: fewer candidates than K (kept in level order); 40 classes at 256 px: more
# (a top-K of them, ranked), where the preselection's bookkeeping is exercised.
@pytest.mark.parametrize("classes,size", [(5, 128), (40, 256)], ids=["all-candidates", "ranked-top-k"])
@pytest.mark.parametrize("case", list(CASES))
def test_in_graph_nms_equals_the_eager_post_process(case, classes, size):
    cfg = CASES[case]
    found, ori, want = _candidates(classes, size, cfg, seed=1)
    # ranked when the levels' nms_pre best outnumber K (nms_pre 40 leaves 3 x 40 = 120)
    assert found.ranked == (classes == 40 and cfg.nms_pre > 40)
    final = nms_in_graph(found, ori, cfg)
    assert final.exact.all()
    for i, (boxes, scores, labels) in enumerate(want):
        n = int(final.count[i])
        assert n == len(scores)
        assert torch.equal(final.boxes[i, :n], boxes)
        assert torch.equal(final.scores[i, :n], scores)
        assert torch.equal(final.labels[i, :n], labels)


def test_in_graph_nms_says_when_its_passes_did_not_settle():
    cfg = PostprocessConfig()
    found, ori, want = _candidates(5, 128, cfg, seed=2)
    assert not nms_in_graph(found, ori, cfg, passes=0).exact.any()  # everything kept: not greedy NMS
    assert nms_in_graph(found, ori, cfg, passes=64).exact.all()


@pytest.fixture(scope="module")
def parity_model(refs):
    from rtmdet.models.checkpoint import load_model

    return load_model(refs / "parity_tiny.pt", "cpu")[0]


@pytest.mark.parametrize("thr,passes", [(0.001, 12), (0.7, 12), (0.7, 0)], ids=["defaults", "score-0.7", "fallback"])
def test_pipeline_on_the_cpu_keeps_detectors_detections(refs, facemask, parity_model, thr, passes):
    e2e = torch.load(refs / "parity_tiny_e2e.pt", weights_only=True)
    image = cv2.imread(str(facemask / "valid" / e2e["image_file"]))
    want = Detector.from_checkpoint(refs / "parity_tiny.pt", image_size=640, score_thr=thr, fast=False)(image)
    pipe = GpuPipeline(parity_model, "cpu", "fp32", postprocess=PostprocessConfig(score_thr=thr), nms_passes=passes)
    boxes, scores, labels = pipe(torch.from_numpy(image))
    # passes=0 cannot be exact in the graph: the answer then comes from torchvision's NMS
    assert len(scores) == len(want) and np.array_equal(labels.numpy(), want.labels)
    assert np.abs(boxes.numpy() - want.boxes).max() <= 1e-2  # folded BatchNorm: float rounding only
    assert np.abs(scores.numpy() - want.scores).max() <= 1e-4


def test_pipeline_second_nms_stage_answers_when_the_first_k_do_not_settle(refs, facemask, parity_model, monkeypatch):
    """64 candidates cannot give 300 detections: the second stage (the eager path's K) answers,
    in its own NMS, without the eager post-process."""
    from rtmdet.inference import gpu

    e2e = torch.load(refs / "parity_tiny_e2e.pt", weights_only=True)
    image = cv2.imread(str(facemask / "valid" / e2e["image_file"]))
    want = Detector.from_checkpoint(refs / "parity_tiny.pt", image_size=640, fast=False)(image)
    pipe = GpuPipeline(parity_model, "cpu", "fp32", first_k=64)
    assert pipe.ks == (64, 4096)
    stages = []
    for i, post in enumerate(pipe._posts):
        pipe._posts[i] = lambda *a, i=i, post=post: stages.append(i) or post(*a)
    monkeypatch.setattr(gpu, "postprocess_batch", lambda *a: pytest.fail("the eager post-process ran"))
    boxes, scores, labels = pipe(torch.from_numpy(image))
    assert stages == [0, 1] and len(want) == 300
    assert len(scores) == len(want) and np.array_equal(labels.numpy(), want.labels)
    assert np.abs(boxes.numpy() - want.boxes).max() <= 1e-2
    assert np.abs(scores.numpy() - want.scores).max() <= 1e-4


def test_pipeline_from_checkpoint(tmp_path):
    from rtmdet.errors import CheckpointError
    from rtmdet.models import build_model
    from rtmdet.models.checkpoint import checkpoint_dict, save_atomic

    save_atomic(checkpoint_dict(build_model("nano", 2, image_size=64), ["cat", "dog"]), tmp_path / "m.pt")
    pipe = GpuPipeline.from_checkpoint(tmp_path / "m.pt", "cpu", "fp32", score_thr=0.2, max_per_img=10)
    assert pipe.classes == ["cat", "dog"] and pipe.cfg == PostprocessConfig(score_thr=0.2, max_per_img=10)
    boxes, scores, labels = pipe(torch.zeros(48, 80, 3, dtype=torch.uint8))
    assert boxes.shape[1] == 4 and len(scores) == len(labels) <= 10 and bool((scores > 0.2).all())
    with pytest.raises(CheckpointError, match="missing.pt"):
        GpuPipeline.from_checkpoint(tmp_path / "missing.pt", "cpu")


def test_pipeline_first_k_follows_max_per_img(parity_model):
    assert GpuPipeline(parity_model, "cpu", "fp32").ks == (2400, 4096)
    assert GpuPipeline(parity_model, "cpu", "fp32", postprocess=PostprocessConfig(max_per_img=100)).ks == (800, 4096)
    assert GpuPipeline(parity_model, "cpu", "fp32", postprocess=PostprocessConfig(max_per_img=20)).ks == (256, 4096)
    assert len(GpuPipeline(parity_model, "cpu", "fp32", first_k=10**6)._posts) == 1  # one stage: the eager K


def test_pipeline_refuses_segment_models_and_bad_images():
    from rtmdet.models import build_model

    with pytest.raises(DataError, match="GpuPipeline runs box models"):
        GpuPipeline(build_model("nano", 3, image_size=64, task="segment"), "cpu", "fp32")
    pipe = GpuPipeline(build_model("nano", 3, image_size=64), "cpu", "fp32")
    with pytest.raises(DataError, match=r"image tensor of shape \(3, 64, 64\)"):
        pipe(torch.zeros(3, 64, 64, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", ["off", "default"])
def test_gpu_pipeline_keeps_the_reference_detections(refs, facemask, parity_model, strict_fp32, compile_):
    e2e = torch.load(refs / "parity_tiny_e2e.pt", weights_only=True)
    var = e2e["variants"][0]
    image = cv2.imread(str(facemask / "valid" / e2e["image_file"]))
    pipe = GpuPipeline(parity_model, "cuda", "fp32", compile_, PostprocessConfig(score_thr=var["score_thr"]))
    for _ in range(2):  # the capture, then a replay
        boxes, scores, labels = pipe(torch.from_numpy(image).cuda())
    h, w = image.shape[:2]
    want = var["bboxes"].clone()  # mmdetection clips to the padded canvas; we clip to the photo
    want[:, 0::2] = want[:, 0::2].clamp(0, w)
    want[:, 1::2] = want[:, 1::2].clamp(0, h)
    assert len(scores) == len(var["scores"])
    assert torch.equal(labels.cpu(), var["labels"])
    assert (boxes.cpu() - want).abs().max() <= 1e-2


@pytest.mark.gpu
def test_gpu_half_pipeline_equals_torchvision_nms_of_its_candidates(refs, facemask, parity_model):
    from rtmdet.inference.postprocess_static import finish_image

    e2e = torch.load(refs / "parity_tiny_e2e.pt", weights_only=True)
    image = torch.from_numpy(cv2.imread(str(facemask / "valid" / e2e["image_file"]))).cuda()
    cfg = PostprocessConfig(score_thr=0.3)
    pipe = GpuPipeline(parity_model, "cuda", "fp16", postprocess=cfg)
    got = pipe(image)
    run = next(iter(pipe._graphs.values()))
    _, _, (found, _, stats) = run.outputs[0]
    assert bool(stats[1])  # exact in the first graph
    for a, b in zip(got, finish_image(found, 0, run.info.ori_hw, cfg, lambda: None)):
        assert torch.equal(a, b)


def test_ties_at_the_cut_of_k_settle_without_the_full_nms(monkeypatch):
    """Half precision rounds logits to few values, so the K-th and K+1-th best scores often tie.
    The K still settle an image when the last kept box scores above the K+1-th: the eager path,
    the fixed-shape path and the in-graph NMS all give the full NMS's answer, without it."""
    from rtmdet.inference import postprocess

    cfg = PostprocessConfig()
    cls, reg = _maps(2, 40, 256, seed=3)
    for i in range(2):  # every logit ranked 3,900th to 4,300th of its image set to one value
        ranked = torch.cat([c[i].flatten() for c in cls]).sort(descending=True).values
        low, high = ranked[4300], ranked[3900]
        for c in cls:
            band = (c[i] >= low) & (c[i] <= high)
            c[i][band] = ranked[4096]
    args = (cls, reg, STRIDES, (256, 256), [(1.0, 1.0)] * 2, [(256, 256)] * 2, cfg)
    inv = torch.ones(2, 4)
    found = select_candidates(cls, reg, STRIDES, (256, 256), inv, cfg)
    assert found.ranked and bool((found.scores[:, -1] == found.beyond).all())  # a tie across the cut
    final = nms_in_graph(found, torch.full((2, 2), 256.0), cfg)
    assert final.exact.all()
    monkeypatch.setattr(postprocess, "PRESELECT", 10**9)  # the full NMS, as the reference
    full = postprocess_batch(*args)
    for i, (boxes, scores, labels) in enumerate(full):
        n = int(final.count[i])
        assert torch.equal(final.boxes[i, :n], boxes) and torch.equal(final.labels[i, :n], labels)
    monkeypatch.undo()
    called = []
    monkeypatch.setattr(postprocess, "batched_nms", lambda b, *a: (called.append(len(b)), batched_nms(b, *a))[1])
    for got, want in zip(postprocess_batch(*args), full):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert max(called) <= postprocess.PRESELECT  # settled by the preselection alone
    from rtmdet.inference import postprocess_static

    monkeypatch.setattr(postprocess_static.eager, "postprocess_batch", None)  # finish_image must not need it
    for got, want in zip(postprocess_static.postprocess_batch_static(*args), full):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
def test_gpu_second_graph_answers_when_the_first_k_do_not_settle(refs, facemask, parity_model, strict_fp32):
    """first_k 64 cannot settle 300 boxes: the second graph's answer equals the eager post-process
    of the same head outputs."""
    e2e = torch.load(refs / "parity_tiny_e2e.pt", weights_only=True)
    image = torch.from_numpy(cv2.imread(str(facemask / "valid" / e2e["image_file"]))).cuda()
    pipe = GpuPipeline(parity_model, "cuda", "fp32", first_k=64)
    for _ in range(2):  # the capture, then a replay
        boxes, scores, labels = pipe(image)
    run = next(iter(pipe._graphs.values()))
    assert not bool(run.outputs[0][2][2][1]) and bool(run.outputs[1][2][1])  # the second graph was exact
    cls, reg = run.outputs[0][:2]
    want = postprocess_batch(cls, reg, pipe.strides, (640, 640), [run.info.scale_wh], [run.info.ori_hw], pipe.cfg)[0]
    assert len(scores) == len(want[1]) == 300 and torch.equal(labels, want[2])
    assert (boxes - want[0]).abs().max() <= 1e-4 and (scores - want[1]).abs().max() <= 1e-6
