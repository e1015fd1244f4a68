"""Classifier QAT: the fake-quant CSPNeXt classifier, its float round trip, and the qat stage's path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rtmdet.config import ExportParams, QATParams, TrainParams
from rtmdet.data.class_folders import load_class_folders
from rtmdet.models import build_classifier
from rtmdet.models.checkpoint import save_classifier_checkpoint
from rtmdet.quantization.classify import prepare_qat_classifier, to_float_classifier
from rtmdet.quantization.fakequant import quantizers
from rtmdet.quantization.model import calibrate
from test_train_classify import make_colors


def _trained_like(seed: int = 0, size: str = "nano", imgsz: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_classifier(size, 3, image_size=imgsz)
    with torch.no_grad():  # BN statistics away from the identity, so folding is really tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


@pytest.mark.parametrize("size", ["nano", "tiny"])
def test_fake_quant_classifier_follows_the_float_model(size):
    model = _trained_like(size=size)
    x = _images()
    with torch.no_grad():
        ref = model(model.normalize(x))
        q = prepare_qat_classifier(model).eval()
        names = [n for n, _ in quantizers(q)]
        assert any("mean" in n for n in names) and any("fc" in n for n in names)  # pool and logits quantized
        weighted = [m for m in q.modules() if hasattr(m, "quantize_weights")]
        assert any(isinstance(m, torch.nn.Linear) for m in weighted)  # the fc's weights are int8 too
        for m in weighted:
            m.quantize_weights = False
        # Activation quantizers pass through until calibrated: left is BN folding and the BGR stem.
        torch.testing.assert_close(q(q.normalize(x)), ref, rtol=1e-3, atol=1e-2 * float(ref.abs().max()))
        for m in weighted:
            m.quantize_weights = True
        uncalibrated = q(q.normalize(x))
        calibrate(q, x.permute(0, 2, 3, 1).float().numpy())
        fq = q(q.normalize(x))
    assert not torch.equal(fq, uncalibrated)  # int8 now changes the numbers ...
    assert float((fq - ref).abs().max()) < 0.1 * float(ref.abs().max()) + 0.05  # ... by little


def test_float_round_trip_gives_the_checkpoints_logits():
    model = _trained_like()
    x = _images()
    back = to_float_classifier(prepare_qat_classifier(model))
    with torch.no_grad():
        torch.testing.assert_close(back(back.normalize(x)), model(model.normalize(x)), rtol=1e-4, atol=1e-4)


def test_qat_stage_on_a_classifier_writes_qat_pt_the_int8_file_and_metrics(tmp_path):
    pytest.importorskip("onnx2tf")
    from rtmdet.export.classify import score_classifier
    from rtmdet.quantization.stage import QATOutputs, run_qat

    root = make_colors(tmp_path / "colors", train=6, val=3, size=(32, 32))
    dataset = load_class_folders(root)
    weights = save_classifier_checkpoint(_trained_like(), dataset.classes, tmp_path / "cls.pt")
    out = QATOutputs(tmp_path / "qat" / "qat.pt", tmp_path / "qat" / "model_int8_qat.tflite", tmp_path / "qat.json")
    metrics = run_qat(weights, dataset, QATParams(epochs=2, batch_size=4, workers=0, freeze_observers_epoch=0),
                      TrainParams(base_batch_size=4), ExportParams(calib_images=8), out=out, progress=False)
    assert out.checkpoint.is_file() and out.tflite.is_file()
    assert json.loads(out.metrics.read_text()) == metrics
    assert metrics["int8"]["top1"] == score_classifier(out.tflite, dataset, "val").top1
    qat = torch.load(out.checkpoint, weights_only=False)
    assert qat["meta"]["task"] == "classify" and len(qat["meta"]["qat"]["history"]) == 2
    assert all(np.isfinite(h["loss"]) for h in qat["meta"]["qat"]["history"])
    assert set(metrics) >= {"float", "fake_quant", "int8"}
    sidecar = json.loads(Path(str(out.tflite).removesuffix(".tflite") + ".json").read_text())
    assert sidecar["task"] == "classify" and sidecar["precision"] == "int8" and sidecar["source"]["qat"] is True


def _qat_agreement(model, dataset, teacher) -> float:
    """How often the fake-quant model's top-1 equals the float model's on the train images, after
    a short fine-tune at a high lr."""
    from rtmdet.export.classify import load_images
    from rtmdet.quantization.qat import finetune

    images = load_images([im.file for im in dataset.splits["train"].images], 32)
    q = prepare_qat_classifier(model)
    finetune(q, dataset, QATParams(epochs=2, lr=0.003, batch_size=4, workers=0, freeze_observers_epoch=0),
             TrainParams(base_batch_size=4, channels_last=False), images.astype(np.float32), torch.device("cpu"),
             progress=False, teacher=teacher)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        return float((q.eval()(q.normalize(x)).argmax(1) == model(model.normalize(x)).argmax(1)).float().mean())


def test_distilled_qat_keeps_the_float_models_answers_where_label_qat_leaves_them(tmp_path):
    # A random classifier's answers are not the labels: fine-tuned on the labels the int8 model
    # learns the colours instead; fine-tuned on the float model's softmax (qat.distill) it keeps
    # the float model's answers, which is what an int8 copy is for.
    dataset = load_class_folders(make_colors(tmp_path / "colors", train=6, val=3, size=(32, 32)))
    model = _trained_like()
    assert _qat_agreement(model, dataset, teacher=model) >= 0.9
    assert _qat_agreement(model, dataset, teacher=None) <= 0.5
