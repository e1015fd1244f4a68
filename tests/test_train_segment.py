"""The segment task on the shared trainer: mask targets, the Dice loss, mask-centred assignment,
and a whole (tiny) RTMDet-Ins training run on the synthetic shapes with their polygons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rtmdet.config import DataParams, ModelParams, TrainParams
from rtmdet.data.loader import collate
from rtmdet.data.masks import mask_loss_targets
from rtmdet.data.synthetic import make_synthetic_dataset
from rtmdet.errors import ConfigError
from rtmdet.models import build_model
from rtmdet.models.checkpoint import config_from_checkpoint, read_checkpoint
from rtmdet.training import train
from rtmdet.training.assigner import DynamicSoftLabelAssigner
from rtmdet.training.losses import make_priors
from rtmdet.training.losses_ins import dice_loss


def test_dice_loss_against_hand_computed_values():
    # Instance 1: p = 0.5 everywhere on a 2x2 mask with one pixel set:
    #   sum(p t) = 0.5, sum(p^2) = 1, sum(t^2) = 1 -> 1 - 2 * 0.5 / 2 = 0.5.
    # Instance 2: p = sigmoid(+-3) on a 1x4 mask [1, 1, 0, 0]:
    #   s = sigmoid(3), q = sigmoid(-3) = 1 - s; sum(p t) = 2s, sum(p^2) = 2s^2 + 2q^2, sum(t^2) = 2.
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    assert dice_loss(logits, targets, eps=0.0).item() == pytest.approx(0.5, abs=1e-7)
    assert dice_loss(logits, targets).item() == pytest.approx(1 - 1.0 / (2 + 2 * 5e-6), abs=1e-7)
    s = 1 / (1 + np.exp(-3.0))
    q = 1 - s
    want = 1 - 2 * (2 * s) / ((2 * s * s + 2 * q * q) + 2)
    got = dice_loss(torch.tensor([[[3.0, 3.0, -3.0, -3.0]]]), torch.tensor([[[1, 1, 0, 0]]]), eps=0.0)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_mask_loss_targets_sample_every_fourth_pixel_and_give_centres_of_mass():
    masks = np.zeros((3, 8, 12), bool)
    masks[0, 1:4, 2:9] = True  # a 3 x 7 block: centre of mass (5, 2) in pixel indices
    masks[1, 6, 10] = True  # one pixel, on the sampled grid (rows 2, 6; columns 2, 6, 10)
    sampled, centers = mask_loss_targets(masks)
    assert sampled.shape == (3, 2, 3) and sampled.dtype == np.uint8
    assert sampled[0].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert sampled[1].tolist() == [[0, 0, 0], [0, 0, 1]]
    assert centers.tolist() == [[5.0, 2.0], [10.0, 6.0], [0.0, 0.0]]  # empty: (0, 0), as mmdetection


def test_collate_pads_masks_and_centres_with_zeros():
    def item(k: int) -> dict:
        return {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "boxes": torch.ones(k, 4),
                "labels": torch.zeros(k, dtype=torch.long), "image_id": k,
                "masks": torch.ones(k, 2, 2, dtype=torch.uint8), "mask_centers": torch.full((k, 2), 3.0)}

    batch = collate([item(1), item(3)])
    assert batch["masks"].shape == (2, 3, 2, 2) and batch["mask_centers"].shape == (2, 3, 2)
    assert batch["masks"][0, 1:].sum() == 0 and batch["masks"][1].sum() == 12
    assert batch["mask_centers"][0, 1:].abs().sum() == 0 and batch["mask_centers"][1, 2].tolist() == [3.0, 3.0]


def test_assigner_centre_prior_measures_from_the_mask_centres():
    # One long box whose object (its mask) sits at its left end: measured from the mask's centre,
    # the positives move to the left.
    priors = make_priors([(16, 16)], (8,))
    gt = torch.tensor([[[8.0, 40.0, 120.0, 72.0]]])
    labels = torch.zeros(1, 1, dtype=torch.long)
    logits = torch.zeros(1, priors.shape[0], 1)
    pred = torch.cat([priors[:, :2] - 12, priors[:, :2] + 12], 1)[None]  # 24 px boxes around each point
    assigner = DynamicSoftLabelAssigner()
    by_box = assigner(logits, pred, priors, gt, labels)
    same = assigner(logits, pred, priors, gt, labels, gt_centers=torch.tensor([[[64.0, 56.0]]]))
    left = assigner(logits, pred, priors, gt, labels, gt_centers=torch.tensor([[[24.0, 56.0]]]))
    assert torch.equal(by_box.fg_mask, same.fg_mask)  # the box centre given as the centre: the same
    x_box = priors[by_box.fg_mask[0], 0].mean()
    x_left = priors[left.fg_mask[0], 0].mean()
    assert left.fg_mask.any() and x_left < x_box - 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("shapes"), seed=3, train=12, valid=4)


def _params(root: Path, task: str = "segment") -> tuple[DataParams, ModelParams, TrainParams]:
    return (DataParams(root=str(root)), ModelParams(size="nano", imgsz=64, task=task),
            TrainParams(epochs=2, batch_size=4, base_batch_size=4, warmup_iters=2, stage2_epochs=1, workers=0,
                        val_interval=1, seed=0, device="cpu"))


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory) -> tuple:
    tmp_path = tmp_path_factory.mktemp("segrun")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(*_params(shapes), tmp_path / "run", live_dir=tmp_path / "live", progress=False), tmp_path
    finally:
        torch.set_num_threads(threads)


def test_segment_task_trains_rtmdet_ins_on_the_shared_trainer(trained: tuple):
    result, tmp_path = trained
    ckpt = read_checkpoint(result.last)
    cfg = config_from_checkpoint(ckpt, result.last)
    assert cfg.task == "segment"
    model = build_model("nano", cfg.num_classes, task="segment")
    model.load_state_dict(ckpt["state_dict"], strict=True)  # an RTMDet-Ins state dict, mask head included
    rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss_mask.tsv").read_text().splitlines()
    values = [float(r.split("\t")[-1]) for r in rows[1:]]
    assert len(values) == 2 and all(0 < v < 2.0 for v in values)  # Dice in (0, 1], weighted 2
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert {"mAP", "mask_mAP", "mask_mAP50"} <= set(summary["val"])  # boxes and masks, validated while training
    assert ckpt["meta"]["mAP"] == result.best_mAP == max(
        float(r.split("\t")[-1]) for r in (tmp_path / "live" / "plots" / "metrics" / "val" / "mask_mAP.tsv")
        .read_text().splitlines()[1:])  # best.pt follows the mask mAP


def test_detect_runs_log_no_mask_loss_and_unknown_tasks_are_one_line(shapes: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="model.task 'pose': training knows detect, segment, rotate, classify"):
        train(*_params(shapes, task="pose"), tmp_path / "rot", progress=False)
    from rtmdet.data.coco import load_dataset

    boxes_only = load_dataset(shapes)
    with pytest.raises(ConfigError, match="read without its instance masks"):
        train(*_params(shapes), tmp_path / "seg", dataset=boxes_only, progress=False)


def test_the_mask_loss_reaches_the_kernels_and_mask_features_of_a_real_batch(shapes: Path):
    from rtmdet.data.coco import load_dataset
    from rtmdet.data.loader import TrainDataset, build_dataloader, set_epochs
    from rtmdet.data.pipeline import PipelineConfig
    from rtmdet.training.losses_ins import RTMDetInsLoss

    dataset = load_dataset(shapes, masks=True)
    loader = build_dataloader(TrainDataset(dataset.splits["train"].records, PipelineConfig.for_size("nano", 64)),
                              4, num_workers=0)
    set_epochs(loader, 0, 1, stage2_from=1)
    batch = next(iter(loader))
    assert batch["masks"].shape[:2] == batch["labels"].shape and batch["masks"].shape[2:] == (16, 16)
    assert batch["masks"].sum() > 0  # the pipeline carried the polygons through mosaic and the rest
    torch.manual_seed(0)
    model = build_model("nano", len(dataset.classes), task="segment")
    loss = RTMDetInsLoss(model.strides)
    targets = {k: batch[k] for k in ("boxes", "labels", "masks", "mask_centers")}
    out = loss.normalize(loss.step_sums(model(model.normalize(batch["images"])), targets))
    assert out["loss_mask"] > 0
    out["loss_mask"].backward()
    head = model.bbox_head
    assert head.mask_head.projection.weight.grad.abs().sum() > 0
    assert sum(c.weight.grad.abs().sum() for c in head.rtm_kernel) > 0
    assert head.rtm_cls[0].weight.grad is None or head.rtm_cls[0].weight.grad.abs().sum() == 0  # masks only


def test_evaluate_picks_the_segment_task_from_the_checkpoint_and_agrees_with_validation(
        trained: tuple, shapes: Path, tmp_path: Path):
    from rtmdet.data.coco import load_dataset
    from rtmdet.evaluation.coco_eval import evaluate_detector
    from rtmdet.evaluation.stage import run_evaluation
    from rtmdet.inference.postprocess_ins import InsPostprocessConfig
    from rtmdet.inference.predictor import Detector
    from rtmdet.models.checkpoint import load_model
    from rtmdet.training.validate import Validator

    result, _ = trained
    out = run_evaluation(result.last, shapes, tmp_path / "reports", splits=("valid",), grid_images=2,
                         batch_size=4, progress=False)["valid"]
    assert out.masks is not None and out.masks.num_images == out.num_images
    metrics = json.loads((tmp_path / "reports" / "metrics" / "evaluate.json").read_text())["valid"]
    assert {"mask_mAP", "mask_mAP50", "mAP"} <= set(metrics)
    header = (tmp_path / "reports" / "evaluate" / "per_class_valid.csv").read_text().splitlines()[0]
    assert header.endswith(",mask_AP,mask_AP50")
    assert (tmp_path / "reports" / "evaluate" / "pr_mask_valid.png").is_file()
    assert json.loads((tmp_path / "reports" / "evaluate" / "pr_mask_valid.json").read_text()) is not None
    # The training-time validation of the same weights makes the same detections and masks (a
    # low score threshold: two epochs leave every score under the default 0.05).
    dataset = load_dataset(shapes, masks=True)
    detector = Detector.from_checkpoint(result.last, score_thr=0.001, batch_size=4)
    dets = evaluate_detector(detector, dataset.splits["valid"], dataset, batch_size=4, progress=False).detections
    assert all(len(d.masks) == len(d) for d in dets.values())
    for rec in dataset.splits["valid"].records:  # every mask is the image's size (COCO's segm needs it)
        assert all(m["size"] == [rec.height, rec.width] for m in dets[int(rec.image_id)].masks)
    model, _ = load_model(result.last, tasks=("segment",))
    val = Validator(dataset.splits["valid"], dataset, 64, torch.device("cpu"), batch_size=4, workers=0, masks=True,
                    postprocess=InsPostprocessConfig(score_thr=0.001))
    try:
        table, rles = val.infer(model)
    finally:
        val.close()
    assert len(table) == sum(len(d) for d in dets.values()) > 0
    row = 0
    for k, rec in enumerate(dataset.splits["valid"].records):
        d = dets[int(rec.image_id)]
        mine = table[row:row + len(d)]
        assert (mine[:, 6] == k).all()
        np.testing.assert_allclose(mine[:, :4], d.boxes, atol=1e-4)
        assert rles[row:row + len(d)] == d.masks
        row += len(d)
    # The worst-images grid tints the masks: ground truth's and predictions'.
    from dataclasses import replace

    from rtmdet.evaluation import plots
    from rtmdet.evaluation.confusion import image_errors, rank_worst

    records = dataset.splits["valid"].records
    ranked = rank_worst(image_errors(records, dets, 0.001, 0.5))
    tinted = plots.worst_images_grid(records, dets, ranked, dataset.classes, 0.001, num_images=2)
    bare = plots.worst_images_grid([replace(r, segmentations=None) for r in records],
                                   {k: replace(d, masks=None) for k, d in dets.items()}, ranked, dataset.classes,
                                   0.001, num_images=2)
    assert tinted.shape == bare.shape and (tinted != bare).any()


def test_onnx_export_of_a_segment_model_gives_the_torch_detections_and_masks(trained: tuple, shapes: Path,
                                                                            tmp_path: Path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from pycocotools import mask as mask_utils

    from rtmdet.data.coco import load_dataset
    from rtmdet.export.backends import detector_from_export
    from rtmdet.export.command import export_checkpoint
    from rtmdet.export.sidecar import read_meta
    from rtmdet.inference.predictor import Detector

    result, _ = trained
    (path,) = export_checkpoint(result.last, "onnx", out=tmp_path)  # checked against torch in ONNX Runtime
    meta = read_meta(path)
    assert meta.kernel_outputs == ["ker_s8", "ker_s16", "ker_s32"] and meta.mask_output == "mask_feat"
    assert "masks" in json.loads(path.with_suffix(".json").read_text())["conventions"]
    files = [r.file for r in load_dataset(shapes).splits["valid"].records]
    torch_dets = Detector.from_checkpoint(result.last, score_thr=0.001)(files)
    onnx_dets = detector_from_export(path, score_thr=0.001)(files)
    assert sum(len(d) for d in torch_dets) > 0
    for t, o in zip(torch_dets, onnx_dets):
        # An untrained model's scores nearly tie, and float32 in another runtime may swap two of
        # them: compare each image's detections as a set, sorted by class and box. At the
        # max_per_img cut, which of two boxes scoring within 1e-6 gets the last places is such a
        # swap too (seen: 0.00972793 vs 0.00972794 after a 100-box cut), so the set left out is
        # the detections within 1e-6 of the lowest kept score, and they may differ by class.
        assert len(t) == len(o)
        floor = min(t.scores.min(initial=1.0), o.scores.min(initial=1.0)) + 1e-6
        kept_t, kept_o = np.flatnonzero(t.scores > floor), np.flatnonzero(o.scores > floor)
        assert len(kept_t) == len(kept_o) >= len(t) // 2  # most are clear of the cut (here 91 of 100)
        order_t, order_o = (k[np.lexsort((d.boxes[k, 1].round(1), d.boxes[k, 0].round(1), d.labels[k]))]
                            for d, k in ((t, kept_t), (o, kept_o)))
        assert np.array_equal(t.labels[order_t], o.labels[order_o])
        np.testing.assert_allclose(o.boxes[order_o], t.boxes[order_t], atol=0.05)
        for i, j in zip(order_t, order_o):
            a, b = ({"size": r["size"], "counts": r["counts"].encode()} for r in (t.masks[i], o.masks[j]))
            assert mask_utils.iou([a], [b], [0])[0, 0] >= 0.99 or mask_utils.area(a) == mask_utils.area(b) == 0


def test_qat_fine_tunes_a_segment_model_with_its_mask_loss(trained: tuple, shapes: Path, tmp_path: Path):
    from rtmdet.config import QATParams
    from rtmdet.data.coco import load_dataset
    from rtmdet.models.checkpoint import load_model
    from rtmdet.quantization.export import calibration_images
    from rtmdet.quantization.model import prepare_qat
    from rtmdet.quantization.qat import finetune
    from rtmdet.quantization.stage import evaluate_model
    from rtmdet.training import losses_ins

    result, _ = trained
    dataset = load_dataset(shapes, masks=True)
    model, _ = load_model(result.last, tasks=("segment",))
    calib, _ = calibration_images(dataset, 4, 0, 64)
    qmodel = prepare_qat(model)
    seen = []
    real = losses_ins.RTMDetInsLoss.step_sums
    try:
        losses_ins.RTMDetInsLoss.step_sums = lambda self, *a, **k: seen.append(1) or real(self, *a, **k)
        tuned = finetune(qmodel, dataset, QATParams(epochs=1, batch_size=4, freeze_observers_epoch=0, workers=0),
                         TrainParams(channels_last=False), calib, torch.device("cpu"), progress=False)
    finally:
        losses_ins.RTMDetInsLoss.step_sums = real
    assert len(seen) >= 2 and np.isfinite(tuned.history[0]["loss"])  # the Ins loss at every step
    h = tuned.history[0]  # the total is its three terms, the mask's reported too
    assert h["loss"] == pytest.approx(h["loss_cls"] + h["loss_bbox"] + h["loss_mask"], rel=1e-4)
    metrics = evaluate_model(qmodel, dataset, torch.device("cpu"), batch_size=4)
    assert "mask_mAP" in metrics  # fake-quant masks scored too
    # What the int8 export converts, and qat.pt's round trip: RTMDet-Ins's reg_convs are its
    # cls_convs under a second name, which the traced model lists once.
    from rtmdet.quantization.export import load_qat, save_qat
    from rtmdet.quantization.model import to_float_model

    folded = to_float_model(qmodel)
    assert torch.equal(folded.bbox_head.reg_convs[0][0].conv.weight, folded.bbox_head.cls_convs[0][0].conv.weight)
    save_qat(qmodel, tmp_path / "qat.pt", dataset.classes, dataset.category_ids, {"params": {}})
    again, _ = load_qat(tmp_path / "qat.pt")
    x = torch.randint(0, 255, (1, 3, 64, 64)).float()
    with torch.no_grad():
        a, b = qmodel.eval()(qmodel.normalize(x)), again(again.normalize(x))
    assert torch.equal(a[3], b[3]) and all(torch.equal(p, q) for p, q in zip(a[2], b[2]))


def test_predict_draws_and_writes_the_masks_of_a_segment_model(trained: tuple, shapes: Path, tmp_path: Path):
    import cv2

    from rtmdet.cli import main
    from rtmdet.data.masks import rle_to_mask

    result, _ = trained
    image = sorted((shapes / "valid").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(result.last), "--source", str(image), "--out", str(out),
                 "--score-thr", "0.001", "--device", "cpu"]) == 0
    rows = json.loads((out / "predictions.json").read_text())
    h, w = cv2.imread(str(image)).shape[:2]
    assert rows and all(r["segmentation"]["size"] == [h, w] for r in rows)
    assert rle_to_mask(rows[0]["segmentation"]).shape == (h, w)
    assert (out / image.with_suffix(".jpg").name).is_file()


@pytest.mark.slow
def test_tflite_of_a_segment_model_scales_its_kernels_and_its_sidecar_scales_them_back(trained: tuple, shapes: Path,
                                                                                tmp_path: Path):
    pytest.importorskip("onnx2tf")
    from rtmdet.data.coco import load_dataset
    from rtmdet.export.backends import detector_from_export
    from rtmdet.export.command import export_checkpoint
    from rtmdet.export.sidecar import read_meta

    result, _ = trained
    dataset = load_dataset(shapes, masks=True)
    paths = export_checkpoint(result.last, "tflite", ["fp32", "int8"], data=dataset, calib_images=8, out=tmp_path)
    for path in paths:  # every file of the run holds scaled kernels, its sidecar the scales
        scale = read_meta(path).kernel_scale
        assert [len(s) for s in scale] == [169] * 3 and min(min(s) for s in scale) > 0
    # The fp32 file's kernels, their scales multiplied back (the backend's level maps), are the
    # model's own: per level, max difference over max value (a short-trained model's masks are
    # empty, so its raw maps are what can be compared).
    from rtmdet.export.tflite import load_calibration
    from rtmdet.inference.preprocess import to_chw_tensor
    from rtmdet.models.checkpoint import load_model

    fp32 = next(p for p in paths if "fp32" in p.name)
    images, _ = load_calibration([r.file for r in dataset.splits["valid"].records[:2]], 64)
    file_maps = detector_from_export(fp32).backend(to_chw_tensor(list(images.astype(np.uint8))))
    model, _ = load_model(result.last, tasks=("segment",))
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        ours = model(model.normalize(x))
    for got, want in zip(file_maps[2], ours[2]):
        assert (got - want).abs().max() / want.abs().max() < 1e-3
