"""The int8 side of an edge model: PTQ and QAT int8 TFLite files of trained checkpoints, scored
by the evaluator of `benchmarks/peer_yolo.py`, with their operator lists and 2-thread latency.

    python benchmarks/edge_int8.py --data ROOT --weights A.pt [B.pt ...] [--qat-epochs 5]
        [--io float int8] [--calib-images 100] [--threads 2] [--out DIR]

For each checkpoint (e.g. the ReLU6 nano that `peer_yolo.py --keep-weights` wrote) it writes to
OUT/<stem>/:
  * the float model's score (torch, CPU), exactly as peer_yolo.py scores it;
  * PTQ int8 with float input/output (`rtmdet export --format tflite --precision int8`,
    calibrated on --calib-images train images) and the same with int8 input and output
    (`--int8-io int8`: raw pixels in as int8, quantized maps out: what a microcontroller runs);
  * with --qat-epochs N > 0, QAT: N epochs of fine-tuning under simulated int8 (the `qat`
    stage's code, train params of params.yaml's defaults), then its int8 file.
Every file is scored on valid at peer_yolo.py's thresholds (score 0.001, NMS IoU 0.65, 100 per
image), its operators are counted (what a TFLite Micro build must register; LOGISTIC, i.e. a
SiLU, is flagged), and the model alone is timed on --threads CPU threads (median of 50 images).
Prints one table, the mean over checkpoints, and writes OUT/edge_int8.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from peer_yolo import MAX_DETS, NMS_IOU, SCORE_THR, score_rtmdet  # noqa: E402 (the same evaluator)

from rtmdet.fileio import write_json_atomic  # noqa: E402

log = logging.getLogger("edge_int8")


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from rtmdet.data.coco import load_dataset

    dataset = load_dataset(args.data)
    rows = []
    for weights in args.weights:
        rows.extend(one_checkpoint(weights, dataset, args))
        write_json_atomic(args.out / "edge_int8.json", {"settings": settings(args), "rows": rows})
    print(format_table(rows))
    print(f"\nwrote {args.out / 'edge_int8.json'}")
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the dataset the checkpoints were trained on")
    p.add_argument("--weights", type=Path, nargs="+", required=True)
    p.add_argument("--qat-epochs", type=int, default=0, help="QAT fine-tuning epochs (0: PTQ only)")
    p.add_argument("--qat-lr", type=float, default=None, help="QAT lr (default: params.yaml's qat.lr)")
    p.add_argument("--io", nargs="+", choices=("float", "int8", "uint8"), default=["float", "int8"],
                   help="PTQ files to make, by input/output type")
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-images", type=int, default=50)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "edge_int8")
    args = p.parse_args()
    for w in args.weights:
        if not w.is_file():
            p.error(f"--weights {w}: no such file")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"data": str(args.data), "io": args.io, "qat_epochs": args.qat_epochs, "qat_lr": args.qat_lr,
            "calib_images": args.calib_images, "threads": args.threads, "score_thr": SCORE_THR,
            "nms_iou": NMS_IOU, "max_dets": MAX_DETS}


def one_checkpoint(weights: Path, dataset: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from rtmdet.export.command import export_checkpoint

    out = args.out / weights.stem
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"checkpoint": weights.name, "format": "float (torch)",
             **_short(score_rtmdet(weights, dataset, _imgsz(weights), "cpu"))}]
    log.info("%s float: mAP %.4f", weights.name, rows[0]["mAP"])
    for io in args.io:
        start = time.perf_counter()
        [path] = export_checkpoint(weights, "tflite", ["int8"], data=dataset, calib_images=args.calib_images,
                                   int8_io=io, out=out / f"ptq_{io}_io")
        rows.append(score_file(weights, f"PTQ int8 ({io} I/O)", path, dataset, args, time.perf_counter() - start))
    if args.qat_epochs > 0:
        rows.append(run_qat(weights, dataset, out / "qat", args))
    return rows


def run_qat(weights: Path, dataset: Any, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from rtmdet.config import load_params
    from rtmdet.quantization.stage import QATOutputs
    from rtmdet.quantization.stage import run_qat as qat_stage
    from rtmdet.training.distributed import resolve_device

    params = load_params(REPO / "params.yaml", sections=("train", "export", "qat"))
    qat = replace(params["qat"], epochs=args.qat_epochs, freeze_observers_epoch=max(args.qat_epochs - 2, 0),
                  **({"lr": args.qat_lr} if args.qat_lr is not None else {}))
    export = replace(params["export"], calib_images=args.calib_images)
    start = time.perf_counter()
    outputs = QATOutputs(out / "qat.pt", out / "model_int8_qat.tflite", out / "qat_metrics.json")
    qat_stage(weights, dataset, qat, params["train"], export, outputs,
              device=str(resolve_device(qat.device, what="qat.device")), progress=False)
    return score_file(weights, f"QAT int8 ({qat.epochs} epochs, float I/O)", outputs.tflite, dataset, args,
                      time.perf_counter() - start)


def score_file(weights: Path, name: str, path: Path, dataset: Any, args: argparse.Namespace,
               seconds: float) -> dict[str, Any]:
    from rtmdet.evaluation.coco_eval import evaluate_detector
    from rtmdet.export.backends import detector_from_export, tflite_operators
    from rtmdet.export.verify import latency_ms

    detector = detector_from_export(path, threads=args.threads, batch_size=32, score_thr=SCORE_THR,
                                    iou_thr=NMS_IOU, max_per_img=MAX_DETS)
    ev = evaluate_detector(detector, dataset.splits["valid"], dataset, batch_size=32, progress=False)
    files = [r.file for r in dataset.splits["valid"].records]
    ops = tflite_operators(path)
    row = {"checkpoint": weights.name, "format": name, "file": str(path), **_short(ev.stats),
           "kb": round(path.stat().st_size / 1024), "ms": round(latency_ms(detector, files, args.latency_images), 2),
           "make_s": round(seconds, 1), "operators": ops, "logistic": "LOGISTIC" in ops}
    log.info("%s %s: mAP %.4f, %d KB, %.2f ms, operators %s", weights.name, name, row["mAP"], row["kb"], row["ms"],
             ", ".join(f"{k} {v}" for k, v in ops.items()))
    return row


def _imgsz(weights: Path) -> int:
    from rtmdet.models.checkpoint import load_model

    model, _ = load_model(weights, "cpu", tasks=("detect",))
    return model.cfg.image_size


def _short(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in ("mAP", "mAP50", "mAP_small") if k in stats}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| checkpoint | format | mAP50-95 | mAP50 | KB | ms (2 threads) | LOGISTIC |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['format']} | {r['mAP']:.4f} | {r['mAP50']:.4f} | {r.get('kb', '')} | "
                     f"{r.get('ms', '')} | {'yes' if r.get('logistic') else ('no' if 'operators' in r else '')} |")
    by_format: dict[str, list[float]] = {}
    for r in rows:
        by_format.setdefault(r["format"], []).append(r["mAP"])
    lines.append("")
    for name, values in by_format.items():
        lines.append(f"mean {name}: {statistics.mean(values):.4f} over {len(values)} ({', '.join(f'{v:.4f}' for v in values)})")
    ops = {json.dumps(r["operators"]) for r in rows if "operators" in r}
    lines.extend(f"operators: {o}" for o in sorted(ops))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
