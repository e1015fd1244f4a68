"""DVC stage `export`: models/best.pt to ONNX and TFLite fp32 / fp16 / int8 in models/export/.

int8 is calibrated on `export.calib_images` images of the prepared train split, pre-processed
exactly as at inference. Offline: nothing is read but the checkpoint and the user's images. The
checkpoint's task picks its outputs (a segment model adds kernels and mask features, an RTMDet-R
its angles) and its dataset (an RTMDet-R calibrates on the DOTA-layout listing).
"""

import shutil
from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.errors import ConfigError
from rtmdet.export.command import export_checkpoint
from rtmdet.failpoints import kill_point
from rtmdet.models.checkpoint import checkpoint_task
from rtmdet.training.tasks import train_task

FORMATS = ("onnx", "tflite_fp32", "tflite_fp16", "tflite_int8")
OUT = Path("models/export")


def main() -> None:
    p = load_params(sections=("export",))["export"]
    formats = p.formats or list(FORMATS)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"params: export.formats has unknown {unknown}; choose from {', '.join(FORMATS)}")
    if p.int8_io not in ("float", "int8", "uint8"):
        raise ConfigError(f"params: export.int8_io must be float, int8 or uint8, got {p.int8_io!r}")
    shutil.rmtree(OUT, ignore_errors=True)  # no stale file of a format no longer asked for
    weights = Path("models/best.pt")
    if "onnx" in formats:
        export_checkpoint(weights, "onnx", out=OUT)
        kill_point("export:file")
    precisions = [f.removeprefix("tflite_") for f in formats if f.startswith("tflite_")]
    if precisions:
        parts = train_task(checkpoint_task(weights)).parts  # int8 calibrates on the task's train images
        dataset = parts.load_prepared(Path("data/prepared"), masks=False) if "int8" in precisions else None
        export_checkpoint(weights, "tflite", precisions, data=dataset, calib_images=p.calib_images,
                          int8_io=p.int8_io, out=OUT, calib_seed=p.seed)
    for f in sorted(OUT.iterdir()):
        print(f"{f} ({f.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    run_stage(main)
