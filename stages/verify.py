"""DVC stage `verify`: torch, ONNX, TFLite fp32 / fp16 / int8 and QAT int8 scored on valid by the
same evaluator; writes reports/metrics/verify.json and fails when a format drifts beyond
verify.max_drop (verify.int8_max_drop for int8)."""

from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.export.verify import run_verify
from rtmdet.models.checkpoint import checkpoint_task
from rtmdet.training.tasks import train_task


def main() -> None:
    v = load_params(sections=("verify",))["verify"]
    # The checkpoint says the task: a segment model is verified on its masks too, a classifier on top-1,
    # an RTMDet-R (rotate) by rotated mAP on its DOTA-layout validation split.
    task = train_task(checkpoint_task(Path("models/best.pt")))
    dataset = task.parts.load_prepared(Path("data/prepared"), task.masks)
    run_verify(Path("models/best.pt"), Path("models/export"), Path("models/qat"), dataset,
               Path("reports/metrics/verify.json"), split=v.split, threads=v.threads,
               latency_images=v.latency_images, batch_size=v.batch_size, max_drop=v.max_drop,
               int8_max_drop=v.int8_max_drop)


if __name__ == "__main__":
    run_stage(main)
