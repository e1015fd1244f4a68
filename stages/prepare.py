"""DVC stage `prepare`: validate params.data's dataset, write data/prepared and reports/prepare
(stats.json, charts, a grid of augmented training samples)."""

from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.data.coco import load_dataset
from rtmdet.data.prepare import plot_stats, prepare
from rtmdet.data.show import draw_augmented_grid
from rtmdet.fileio import write_json_atomic
from rtmdet.training.tasks import train_task

OUT, REPORTS = Path("data/prepared"), Path("reports/prepare")


def main() -> None:
    params = load_params(sections=("data", "model"))
    data, model = params["data"], params["model"]
    splits = data.split_files()
    masks = train_task(model.task).masks  # the segment task keeps each instance's mask
    dataset = load_dataset(data.root if splits is None else Path(data.root), splits=splits, masks=masks)
    stats = prepare(dataset, OUT, model.imgsz, data.num_classes, masks=masks)
    write_json_atomic(REPORTS / "stats.json", stats)  # images/boxes per class, sizes, skipped per reason
    plot_stats(stats, REPORTS)
    draw_augmented_grid(dataset.splits["train"].records, dataset.classes, REPORTS / "augmented.png",
                        model.imgsz, size=model.size)


if __name__ == "__main__":
    run_stage(main)
