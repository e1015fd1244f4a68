"""DVC stage `evaluate`: score models/best.pt on valid (and test) and write reports/."""

from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.evaluation.stage import run_evaluation
from rtmdet.models.checkpoint import checkpoint_task
from rtmdet.training.tasks import train_task
from rtmdet.training.distributed import resolve_device


MODEL = Path("models/best.pt")


def main() -> None:
    ev = load_params(sections=("evaluate",))["evaluate"]
    # The task comes from the checkpoint: a segment model is scored by its masks too, a classifier by top-1.
    task = train_task(checkpoint_task(MODEL))
    dataset = task.parts.load_prepared(Path("data/prepared"), task.masks)
    run_evaluation(MODEL, dataset, Path("reports"), splits=ev.splits or ("valid", "test"),
                   device=str(resolve_device(ev.device, what="evaluate.device")), score_thr_confusion=ev.conf_thr,
                   grid_images=ev.grid_images, batch_size=ev.batch_size)


if __name__ == "__main__":
    run_stage(main)
