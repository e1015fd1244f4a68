"""DVC stage `prepare`: validate params.data's dataset, write data/prepared and reports/prepare
(stats.json; for boxes also charts and a grid of augmented training samples). model.task's parts
(rtmdet.training.task_parts) say how: a COCO dataset for detect/segment, class folders (or the
boxes of a COCO dataset cut into them) for classify."""

from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.training.tasks import train_task

OUT, REPORTS = Path("data/prepared"), Path("reports/prepare")


def main() -> None:
    params = load_params(sections=("data", "model"))
    data, model = params["data"], params["model"]
    task = train_task(model.task)
    task.parts.prepare(data, model, task.masks, OUT, REPORTS)  # segment: each instance's mask is kept


if __name__ == "__main__":
    run_stage(main)
