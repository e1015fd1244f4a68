"""Print float vs fake-quant vs PTQ int8 vs QAT int8 mAP on valid, one evaluator for all.

    python -m rtmdet.quantization.compare [--weights models/best.pt] [--qat models/qat/qat.pt]
        [--qat-tflite models/qat/model_int8_qat.tflite] [--prepared data/prepared]
        [--calib-images 100] [--seed 0] [--ptq-tflite FILE] [--finetune-control]

PTQ int8 is the float checkpoint through the ordinary int8 export with the same calibration
images (made in a temporary folder unless --ptq-tflite names one). --finetune-control also
fine-tunes the float model with the QAT recipe but no fake-quant (reading params.yaml), to
separate what the extra epochs give from what quantization-awareness gives.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _row(name: str, metrics: dict) -> str:
    return f"| {name} | {metrics['mAP']:.4f} | {metrics['mAP50']:.4f} |"


def _tflite_metrics(path: Path, dataset) -> dict:
    from rtmdet.evaluation.coco_eval import evaluate_detector
    from rtmdet.export.backends import detector_from_export

    return evaluate_detector(detector_from_export(path), dataset.splits["valid"], dataset, progress=False).to_metrics()


def _finetune_control(weights: Path, dataset, calib, device: torch.device) -> tuple[dict, dict]:
    """The QAT recipe without fake-quant: (float metrics, metrics of its int8 simulation)."""
    from rtmdet.config import load_params
    from rtmdet.models.checkpoint import load_model
    from rtmdet.quantization.fakequant import set_fake_quant
    from rtmdet.quantization.model import calibrate, prepare_qat
    from rtmdet.quantization.qat import finetune
    from rtmdet.quantization.stage import evaluate_model

    params = load_params(sections=("train", "qat"))
    model = prepare_qat(load_model(weights)[0])
    set_fake_quant(model, False, weights=False)
    finetune(model, dataset, params["qat"], params["train"], calib, device, progress=False)
    float_metrics = evaluate_model(model, dataset, device)
    set_fake_quant(model, True, weights=True)
    calibrate(model, calib)
    return float_metrics, evaluate_model(model, dataset, device)


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table (markdown)."""
    from rtmdet.data.prepare import load_prepared
    from rtmdet.export.tflite import export_tflite
    from rtmdet.models.checkpoint import load_model
    from rtmdet.quantization.export import calibration_images, load_qat
    from rtmdet.quantization.stage import evaluate_model

    p = argparse.ArgumentParser(prog="python -m rtmdet.quantization.compare", description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=Path("models/best.pt"))
    p.add_argument("--qat", type=Path, default=Path("models/qat/qat.pt"))
    p.add_argument("--qat-tflite", type=Path, default=Path("models/qat/model_int8_qat.tflite"))
    p.add_argument("--ptq-tflite", type=Path, default=None)
    p.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-control", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    device = torch.device("cpu")
    dataset = load_prepared(args.prepared)
    model, _ = load_model(args.weights)
    calib, files = calibration_images(dataset, args.calib_images, args.seed, model.cfg.image_size)
    rows = [_row("float torch (best.pt)", evaluate_model(model, dataset, device))]
    with tempfile.TemporaryDirectory() as tmp:
        ptq = args.ptq_tflite
        if ptq is None:
            (ptq_export,) = export_tflite(model, tmp, ["int8"], calibration=calib, calib_files=files,
                                          classes=dataset.classes, category_ids=dataset.category_ids)
            ptq = ptq_export.path
        rows.append(_row("PTQ int8 TFLite (best.pt)", _tflite_metrics(ptq, dataset)))
    rows.append(_row("fake-quant torch (qat.pt)", evaluate_model(load_qat(args.qat)[0], dataset, device)))
    rows.append(_row("QAT int8 TFLite", _tflite_metrics(args.qat_tflite, dataset)))
    if args.finetune_control:
        tuned, simulated = _finetune_control(args.weights, dataset, calib, device)
        rows.append(_row("control: float fine-tune, same recipe, no fake-quant", tuned))
        rows.append(_row("control: its int8 (fake-quant simulation)", simulated))
    print("| model | mAP | mAP50 |\n|---|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
