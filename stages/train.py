"""DVC stage `train`: train params.model on data/prepared; resumable state in runs/train.

train.gpus (auto: every visible GPU) ranks are started here; under torchrun (several nodes, see
the README) each rank runs this script as the rank it is. With train.teacher a model size, that
teacher trains first (runs/teacher) and the student is distilled from it; reports/train/teacher.json
puts the two side by side ({} without a teacher).
"""

import json
import os
import shutil
from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.fileio import write_atomic
from rtmdet.training.launch import train_with_teacher
from rtmdet.training.tasks import train_task

RUN_DIR, TEACHER_DIR, MODEL = Path("runs/train"), Path("runs/teacher"), Path("models/best.pt")
TEACHER_JSON = Path("reports/train/teacher.json")


def main() -> None:
    params = load_params(sections=("data", "model", "train"))
    task = train_task(params["model"].task)
    dataset = task.parts.load_prepared(Path("data/prepared"), task.masks)
    TEACHER_DIR.mkdir(parents=True, exist_ok=True)  # a DVC output, also when there is no teacher:
    # one line in it says which, so DVC never warns of an empty output folder
    write_atomic(TEACHER_DIR / "teacher.txt", f"train.teacher: {params['train'].teacher or 'null'}\n".encode())
    result, teacher = train_with_teacher(params["data"], params["model"], params["train"], RUN_DIR, TEACHER_DIR,
                                         dataset=dataset, live_dir=Path("reports/train"))
    if int(os.environ.get("RANK", "0")) == 0:
        MODEL.parent.mkdir(parents=True, exist_ok=True)
        tmp = MODEL.with_name(f".{MODEL.name}.tmp")
        shutil.copyfile(result.best or result.last, tmp)
        os.replace(tmp, MODEL)
        side = {}
        if params["train"].teacher:
            side = {"teacher": params["train"].teacher, "student_mAP": result.best_mAP,
                    "student_train_seconds": result.seconds}
            if teacher is not None:
                side.update(teacher_mAP=teacher.best_mAP, teacher_epochs=teacher.epochs,
                            teacher_train_seconds=teacher.seconds)
        write_atomic(TEACHER_JSON, json.dumps(side, indent=2).encode())


if __name__ == "__main__":
    run_stage(main)
