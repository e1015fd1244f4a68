"""RTMDet-R training (model.task rotate): the rotated assigner, loss, post-process, validator and
one short run of the shared trainer on a small DOTA-layout dataset."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.data.dota import load_dota, read_prepared, write_prepared
from rtmdet.errors import DataError
from rtmdet.evaluation.rotated_eval import RotatedPredictor, score_rotated, truths_of
from rtmdet.evaluation.rotated_map import RotatedDetections
from rtmdet.geometry.rotated import rbox_to_corners, rotated_iou
from rtmdet.inference.rotated import RotatedPostprocessConfig, postprocess_rotated, rescale_rboxes
from rtmdet.models.checkpoint import load_model
from rtmdet.models.detector import build_model
from rtmdet.models.head_rotated import REG_BIAS_INIT
from rtmdet.training.assigner import DynamicSoftLabelAssigner
from rtmdet.training.losses import make_priors
from rtmdet.training.losses_rotated import RotatedDynamicSoftLabelAssigner, RotatedRTMDetLoss, points_inside_rboxes
from rtmdet.training.tasks import train_task
from rtmdet.training.trainer import train


def _xyxy_to_rbox(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2, b[..., 2] - b[..., 0],
                        b[..., 3] - b[..., 1], torch.zeros_like(b[..., 0])], -1)


def test_points_inside_a_turned_box():
    box = torch.tensor([[50.0, 50.0, 40.0, 10.0, math.pi / 4]])
    pts = torch.tensor([[50.0, 50.0], [60.0, 60.0], [60.0, 40.0], [64.0, 36.0], [50.0, 70.0]])
    inside = points_inside_rboxes(pts, box)[:, 0].tolist()
    # along the width axis (+x+y at 45 degrees) up to 20 px; across it only 5 px
    assert inside == [True, True, False, False, False]


def test_rotated_assigner_equals_the_box_assigner_on_upright_boxes():
    """At angle 0 a rotated box is an xyxy box: same candidates, IoUs, costs, hence the same assignment."""
    g = torch.Generator().manual_seed(0)
    priors = make_priors([(8, 8), (4, 4), (2, 2)], (8, 16, 32))
    a = priors.shape[0]
    logits = torch.randn(2, a, 3, generator=g)
    centers = priors[:, :2] + torch.rand(a, 2, generator=g) * 4
    sizes = 4 + torch.rand(a, 2, generator=g) * 30
    pred = torch.cat([centers - sizes / 2, centers + sizes / 2], -1).expand(2, -1, -1).contiguous()
    gts = torch.tensor([[[3.3, 5.1, 40.7, 33.9], [20.2, 18.6, 61.4, 60.3]],
                        [[10.1, 12.7, 50.2, 30.3], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 2], [1, -1]])
    ref = DynamicSoftLabelAssigner()(logits, pred, priors, gts, labels)
    got = RotatedDynamicSoftLabelAssigner()(logits, _xyxy_to_rbox(pred), priors, _xyxy_to_rbox(gts), labels)
    assert ref.fg_mask.sum() > 0
    assert torch.equal(ref.fg_mask, got.fg_mask) and torch.equal(ref.labels, got.labels)
    assert torch.equal(ref.gt_inds, got.gt_inds)
    assert torch.allclose(ref.assign_metrics, got.assign_metrics, atol=1e-5)
    assert torch.allclose(_xyxy_to_rbox(ref.bbox_targets)[ref.fg_mask], got.bbox_targets[got.fg_mask])


def _model_outputs(model, size=64):
    torch.manual_seed(0)
    return model(torch.randn(2, 3, size, size))


def test_rotated_loss_trains_every_head_branch_and_prefers_the_right_box():
    model = build_model("tiny", 2, task="rotate")
    crit = RotatedRTMDetLoss(model.strides)
    gts = torch.tensor([[[30.0, 30.0, 30.0, 12.0, 0.5]], [[0.0, 0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1], [-1]])
    out = crit.normalize(crit.step_sums(_model_outputs(model), {"rboxes": gts, "labels": labels}))
    assert out["num_pos"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    head = model.bbox_head
    for name in ("rtm_cls", "rtm_reg", "rtm_ang"):
        assert getattr(head, name)[0].weight.grad.abs().sum() > 0, name
    # The box loss of a prediction on its target is lower than of one turned away from it.
    from rtmdet.training.losses_rotated import rotated_iou_loss

    target = gts[0]
    assert rotated_iou_loss(target, target).item() < 1e-5
    turned = target.clone()
    turned[:, 4] += 0.8
    assert rotated_iou_loss(turned, target).item() > 0.3


def test_rotated_loss_without_positives_still_reaches_the_angle_convs():
    model = build_model("tiny", 1, task="rotate")
    crit = RotatedRTMDetLoss(model.strides)
    out = crit.normalize(crit.step_sums(_model_outputs(model), {"rboxes": torch.zeros(2, 1, 5),
                                                                "labels": torch.full((2, 1), -1)}))
    assert out["num_pos"] == 0
    out["loss"].backward()
    assert model.bbox_head.rtm_ang[0].weight.grad is not None


def test_tiny_head_starts_with_boxes_of_one_stride():
    tiny, m = build_model("tiny", 1, task="rotate"), build_model("m", 1, task="rotate")
    assert all(float(c.bias.detach().mean()) == REG_BIAS_INIT for c in tiny.bbox_head.rtm_reg)
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in m.bbox_head.rtm_reg)  # exp on distances: exp(0) = 1


def test_postprocess_decodes_rescales_and_suppresses():
    strides = (8, 16, 32)
    cls = [torch.full((1, 1, 64 // s, 64 // s), -10.0) for s in strides]
    reg = [torch.full((1, 4, 64 // s, 64 // s), 4.0) for s in strides]
    ang = [torch.zeros((1, 1, 64 // s, 64 // s)) for s in strides]
    reg[0][:] = 8.0  # stride 8: 16 x 16 boxes
    cls[0][0, 0, 2, 3] = 5.0  # the point (24, 16): a 16 x 16 box around it, turned 0.3 rad
    cls[0][0, 0, 2, 4] = 4.0  # (32, 16): overlaps it by IoU > 0.1, suppressed
    cls[1][0, 0, 3, 3] = 3.0  # (48, 48) at stride 16: far away, kept
    ang[0][0, 0, 2, 3] = 0.3
    (boxes, scores, labels), = postprocess_rotated(cls, reg, ang, strides, [(0.5, 0.5)],
                                                   RotatedPostprocessConfig(score_thr=0.05))
    assert len(scores) == 2 and scores[0] > scores[1]
    torch.testing.assert_close(boxes[0], torch.tensor([48.0, 32.0, 32.0, 32.0, 0.3]))  # canvas / 0.5
    torch.testing.assert_close(boxes[1], torch.tensor([96.0, 96.0, 16.0, 16.0, 0.0]))


def test_rescale_of_an_unequal_scale_keeps_the_corners_on_the_map():
    box = torch.tensor([[40.0, 30.0, 20.0, 6.0, 0.7]])
    out = rescale_rboxes(box, (0.5, 0.25))
    corners = rbox_to_corners(box)[0] / torch.tensor([0.5, 0.25])
    # the mapped rectangle is a parallelogram; its fitted box has the same centre and covers it closely
    assert torch.allclose(out[0, :2], corners.mean(0), atol=1e-4)
    assert rotated_iou(out, out, aligned=True).item() == pytest.approx(1.0)


def _square(rng, w, h):
    """A bright square turned by a random angle on a dark image, and its (cx, cy, side, angle)."""
    cx, cy, side, a = rng.uniform(24, w - 24), rng.uniform(24, h - 24), rng.uniform(14, 22), rng.uniform(-0.7, 0.7)
    return cx, cy, side, a


def make_rotated_dataset(root: Path, n_train=6, n_valid=3, size=96) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_valid)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labelTxt").mkdir(parents=True)
        for i in range(n):
            image = np.full((size, size, 3), 40, np.uint8)
            cx, cy, side, a = _square(rng, size, size)
            quad = rbox_to_corners(torch.tensor([cx, cy, side, side * 0.6, a], dtype=torch.float64)).numpy()
            cv2.fillPoly(image, [np.round(quad).astype(np.int32)], (230, 200, 90))
            cv2.imwrite(str(root / split / "images" / f"{i}.png"), image)
            line = " ".join(f"{v:.2f}" for v in quad.reshape(-1)) + " tile 0"
            (root / split / "labelTxt" / f"{i}.txt").write_text(line + "\n")
    return root


def test_dota_reads_a_valid_folder_and_refuses_two_validation_splits(tmp_path):
    root = make_rotated_dataset(tmp_path / "d", n_train=2, n_valid=1)
    ds = load_dota(root)
    assert set(ds.splits) == {"train", "valid"} and ds.validation() is ds.splits["valid"]
    (root / "val").mkdir()
    with pytest.raises(DataError, match="both val/ and valid/"):
        load_dota(root)


def test_prepared_listing_round_trips(tmp_path):
    ds = load_dota(make_rotated_dataset(tmp_path / "d", n_train=2, n_valid=1))
    back = read_prepared(tmp_path) if write_prepared(ds, tmp_path) else None
    assert back.classes == ds.classes and set(back.splits) == set(ds.splits)
    for a, b in zip(ds.splits["train"].records, back.splits["train"].records):
        assert a.file == b.file and (a.width, a.height) == (b.width, b.height)
        np.testing.assert_allclose(a.rboxes, b.rboxes, atol=1e-4)
        assert np.array_equal(a.labels, b.labels)
    (tmp_path / "rotated.json").write_text("{broken")
    with pytest.raises(DataError, match="rotated.json: broken JSON"):
        read_prepared(tmp_path)


def test_score_rotated_of_the_truth_itself_is_one(tmp_path):
    ds = load_dota(make_rotated_dataset(tmp_path / "d", n_train=2, n_valid=3))
    records = ds.splits["valid"].records
    truths = truths_of(records)
    perfect = [RotatedDetections(t.rboxes, np.ones(len(t.labels), np.float32), t.labels) for t in truths]
    scored = score_rotated(perfect, truths, ds.classes)
    assert scored["mAP"] == pytest.approx(1.0) and scored["mAP50_area"] == pytest.approx(1.0)
    shifted = [RotatedDetections(t.rboxes + np.array([4.0, 0, 0, 0, 0]), d.scores, d.labels)
               for t, d in zip(truths, perfect)]
    worse = score_rotated(shifted, truths, ds.classes)
    assert worse["mAP50"] == pytest.approx(1.0) and worse["mAP"] < 0.9


def test_rotate_task_trains_validates_and_saves_a_loadable_checkpoint(tmp_path):
    root = make_rotated_dataset(tmp_path / "d")
    result = train(DataParams(root=str(root)), ModelParams(size="tiny", imgsz=96, task="rotate"),
                   TrainParams(epochs=2, batch_size=2, base_batch_size=16, warmup_iters=2, stage2_epochs=0,
                               val_interval=1, workers=0, device="cpu", amp="off", compile=False),
                   tmp_path / "run", progress=False)
    assert result.best is not None and result.epochs == 2
    assert set(result.metrics) >= {"mAP", "mAP50", "mAP75", "per_class"}
    model, ckpt = load_model(result.best, "cpu", tasks=("rotate",))
    assert model.cfg.task == "rotate" and ckpt["meta"]["dataset_meta"]["classes"] == ["tile"]
    image = cv2.imread(str(root / "valid" / "images" / "0.png"))
    dets, = RotatedPredictor(model, 96, "cpu", RotatedPostprocessConfig(score_thr=0.0, max_per_img=5))([image])
    assert dets.rboxes.shape[1] == 5 and len(dets.scores) <= 5
    # The evaluate stage picks the rotated reports from the checkpoint's task.
    from rtmdet.evaluation.stage import run_evaluation

    metrics = run_evaluation(result.best, root, tmp_path / "reports", splits=("valid",), grid_images=2)
    assert set(metrics) == {"valid"} and metrics["valid"]["num_images"] == 3
    assert {"mAP", "mAP50", "AP/tile", "precision_at_conf"} <= set(metrics["valid"])
    written = {p.name for p in (tmp_path / "reports" / "evaluate").iterdir()}
    assert written == {"per_class_valid.csv", "per_class_valid.json", "pr_valid.json", "pr_valid.png",
                       "worst_valid.png"}
    assert (tmp_path / "reports" / "metrics" / "evaluate.json").is_file()


def test_image_errors_count_misses_and_false_alarms_at_the_threshold():
    from rtmdet.data.dota import RotatedRecord
    from rtmdet.evaluation.rotated_stage import image_errors

    rec = RotatedRecord(0, Path("x.png"), 100, 100, np.array([[20, 20, 10, 6, 0.3], [70, 70, 12, 12, 0.0]], np.float32),
                        np.array([0, 1]), np.array([False, False]))
    det = RotatedDetections(np.array([[20, 20, 10, 6, 0.3], [70, 70, 12, 12, 0.0], [40, 40, 5, 5, 0.0]]),
                            np.array([0.9, 0.8, 0.1], np.float32), np.array([0, 0, 1]))
    missed, false = image_errors(det, rec, score_thr=0.05)
    assert missed.tolist() == [False, True]  # the second box was found with the wrong class
    assert false.tolist() == [False, True, True]
    missed, false = image_errors(det, rec, score_thr=0.85)
    assert missed.tolist() == [False, True] and false.tolist() == [False]


def test_rotate_task_reads_coco_polygons_as_their_minimum_area_rectangles(tmp_path):
    import json

    box = torch.tensor([60.0, 40.0, 50.0, 16.0, 0.4], dtype=torch.float64)
    quad = rbox_to_corners(box).numpy()
    wiggle = np.array([[0.5 * (quad[0, 0] + quad[1, 0]), 0.5 * (quad[0, 1] + quad[1, 1])]])  # a point on an edge
    poly = np.concatenate([quad[:1], wiggle, quad[1:]]).reshape(-1).round(3).tolist()
    for split in ("train", "valid"):
        (tmp_path / split).mkdir()
        cv2.imwrite(str(tmp_path / split / "a.png"), np.zeros((90, 120, 3), np.uint8))
        x, y = quad[:, 0], quad[:, 1]
        doc = {"images": [{"id": 1, "file_name": "a.png", "width": 120, "height": 90}],
               "categories": [{"id": 1, "name": "tile"}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [poly],
                                "bbox": [x.min(), y.min(), x.max() - x.min(), y.max() - y.min()], "area": 800.0}]}
        (tmp_path / split / "_annotations.coco.json").write_text(json.dumps(doc))
    ds = train_task("rotate").parts.read_dataset(DataParams(root=str(tmp_path)), False)
    assert ds.classes == ["tile"] and set(ds.splits) == {"train", "valid"}
    got = torch.from_numpy(ds.splits["train"].records[0].rboxes).double()
    assert rotated_iou(got, box[None]).item() > 0.999
