"""DVC stage `train`: train params.model on data/prepared; resumable state in runs/train.

train.gpus (auto: every visible GPU) ranks are started here; under torchrun (several nodes, see
the README) each rank runs this script as the rank it is.
"""

import os
import shutil
from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.data.prepare import load_prepared
from rtmdet.training.launch import train_on_gpus

RUN_DIR, MODEL = Path("runs/train"), Path("models/best.pt")


def main() -> None:
    params = load_params(sections=("data", "model", "train"))
    dataset = load_prepared(Path("data/prepared"))
    result = train_on_gpus(params["data"], params["model"], params["train"], RUN_DIR, dataset=dataset,
                           live_dir=Path("reports/train"))
    if int(os.environ.get("RANK", "0")) == 0:
        MODEL.parent.mkdir(parents=True, exist_ok=True)
        tmp = MODEL.with_name(f".{MODEL.name}.tmp")
        shutil.copyfile(result.best or result.last, tmp)
        os.replace(tmp, MODEL)


if __name__ == "__main__":
    run_stage(main)
