"""DVC stage `qat`: fine-tune models/best.pt under simulated TFLite int8, export the int8 file.

Writes models/qat/qat.pt, models/qat/model_int8_qat.tflite (+ .json sidecar) and
reports/metrics/qat.json (float and fake-quant mAP on valid, epochs, seconds). The checkpoint's
task picks the data and loss: an RTMDet-R fine-tunes on the DOTA-layout listing with its rotated
loss and is scored by rotated mAP; a classifier on class folders by top-1.
"""

from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.models.checkpoint import checkpoint_task
from rtmdet.quantization.stage import run_qat
from rtmdet.training.distributed import resolve_device
from rtmdet.training.tasks import train_task


def main() -> None:
    params = load_params(sections=("train", "export", "qat"))
    qat = params["qat"]
    task = train_task(checkpoint_task(Path("models/best.pt")))  # detect, segment, rotate or classify
    dataset = task.parts.load_prepared(Path("data/prepared"), task.masks)
    run_qat(Path("models/best.pt"), dataset, qat, params["train"], params["export"],
            device=str(resolve_device(qat.device, what="qat.device")))


if __name__ == "__main__":
    run_stage(main)
