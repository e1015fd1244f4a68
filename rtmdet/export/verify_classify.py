"""The `verify` stage for a CSPNeXt classifier: every format scored by top-1 on one split.

The checkpoint and each export (found as for detectors: rtmdet.export.verify.find_exports) run
through the same eval_transform pre-process and the same scoring
(rtmdet.export.classify.score_classifier), on the CPU with a fixed thread count. verify.json
has the detector's layout (split, threads, formats) plus `task: classify` and `metric: top1`;
each row holds top1, top5, `drop` (torch top-1 minus the format's, a fraction), the file size,
the median latency of one image through the runner (pre-processed pixels in, logits back) and,
for .tflite files, their operators.

`max_drop` / `int8_max_drop` limit the top-1 drop here (mAP drops for detectors).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rtmdet.data.class_folders import SPLIT_FOLDERS, ClassificationDataset
from rtmdet.export.verify import FORMAT_ORDER, VerifyError, find_exports
from rtmdet.failpoints import kill_point
from rtmdet.fileio import write_json_atomic

log = logging.getLogger(__name__)

TASK = "classify"
METRIC = "top1"


@dataclass
class ClassifierScore:
    """One format's top-1 / top-5 on the split, its size and latency."""

    name: str
    path: Path
    top1: float
    top5: float | None
    size_mb: float
    latency_ms: float

    def row(self, torch_top1: float) -> dict[str, Any]:
        row = {"top1": self.top1, "top5": self.top5, "drop": round(torch_top1 - self.top1, 5),
               "size_mb": round(self.size_mb, 3), "latency_ms": round(self.latency_ms, 2), "file": str(self.path)}
        if self.path.suffix == ".tflite":  # what a runtime must implement to run the file
            from rtmdet.export.backends import tflite_operators

            row["operators"] = tflite_operators(self.path)
        return row


def classifier_split(dataset: ClassificationDataset, split: str) -> str:
    """The dataset's name for `split`: the stage's default "valid" (and "validation") is "val"."""
    name = next((key for key, aliases in SPLIT_FOLDERS.items() if split in aliases), split)
    if name not in dataset.splits:
        raise VerifyError(f"{dataset.root}: split {split!r} not in the dataset (splits: {', '.join(dataset.splits)})")
    return name


def open_runners(weights: Path, exports: dict[str, Path], dataset: ClassificationDataset,
                 threads: int) -> list[tuple[str, Path, Callable[[np.ndarray], np.ndarray], int]]:
    """(format, file, run, image_size) of the checkpoint and every export, all opened (and their
    classes checked against the dataset's) before any is scored: a bad file fails at once."""
    from rtmdet.export.classify import classifier_runner

    files = [("torch", weights)] + [(name, exports[name]) for name in FORMAT_ORDER[1:] if name in exports]
    opened = []
    for name, path in files:
        run, size, classes = classifier_runner(path, threads)
        if classes != dataset.classes:
            raise VerifyError(f"{path}: its classes ({', '.join(classes[:5])}) are not the dataset's "
                              f"({', '.join(dataset.classes[:5])}, from {dataset.root})")
        opened.append((name, path, run, size))
    return opened


def latency_ms(run: Callable[[np.ndarray], np.ndarray], files: list[Path], size: int, count: int) -> float:
    """Median milliseconds of one pre-processed image through `run` (after 3 warm-up runs)."""
    from rtmdet.export.classify import load_images

    images = load_images(files[:max(count, 1)], size)
    batches = [images[i : i + 1] for i in range(len(images))]
    for x in batches[:3]:
        run(x)
    times = []
    for x in batches:
        start = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def score_format(name: str, path: Path, run, size: int, dataset: ClassificationDataset, split: str,
                 latency_images: int, batch_size: int, threads: int) -> ClassifierScore:
    from rtmdet.export.classify import score_classifier

    result = score_classifier(path, dataset, split, batch_size, threads)
    ms = latency_ms(run, [im.file for im in dataset.splits[split].images], size, latency_images)
    mb = path.stat().st_size / 1e6
    log.info("%-12s top-1 %.4f  %.2f MB  %.2f ms/img", name, result.top1, mb, ms)
    return ClassifierScore(name, path, result.top1, result.top5, mb, ms)


def verify_classifier(weights: str | Path, exports: dict[str, Path], dataset: ClassificationDataset, *,
                      split: str = "val", threads: int = 2, latency_images: int = 50,
                      batch_size: int = 8) -> list[ClassifierScore]:
    """Score the classifier checkpoint and every export on `split` (CPU, `threads` threads)."""
    import torch

    split = classifier_split(dataset, split)
    torch.set_num_threads(threads)
    scores = []
    for name, path, run, size in open_runners(Path(weights), exports, dataset, threads):
        scores.append(score_format(name, path, run, size, dataset, split, latency_images, batch_size, threads))
        kill_point("verify:format")
    return scores


def report(scores: list[ClassifierScore], split: str, threads: int) -> dict[str, Any]:
    """verify.json's content: {task, metric, split, threads, formats: {name: row}}."""
    torch_top1 = next(s.top1 for s in scores if s.name == "torch")
    return {"task": TASK, "metric": METRIC, "split": split, "threads": threads,
            "formats": {s.name: s.row(torch_top1) for s in scores}}


def check_drops(summary: dict[str, Any], max_drop: float, int8_max_drop: float) -> list[str]:
    """One line per format whose top-1 fell further below torch than allowed."""
    problems = []
    for name, row in summary["formats"].items():
        int8 = "int8" in name
        limit = int8_max_drop if int8 else max_drop
        if name != "torch" and row["drop"] > limit:
            problems.append(f"{name} ({row['file']}): top-1 {row['top1']:.4f} is {row['drop']:.4f} below torch, "
                            f"more than the allowed {limit} (verify.{'int8_' if int8 else ''}max_drop)")
    return problems


def format_table(summary: dict[str, Any]) -> str:
    lines = ["| format | top-1 | top-5 | drop vs torch | size MB | CPU ms/img |", "|---" * 6 + "|"]
    for name, r in summary["formats"].items():
        top5 = "" if r["top5"] is None else f"{r['top5']:.4f}"
        drop = "" if name == "torch" else f"{r['drop']:+.4f}"
        lines.append(f"| {name} | {r['top1']:.4f} | {top5} | {drop} | {r['size_mb']:.2f} | {r['latency_ms']:.2f} |")
    return "\n".join(lines)


def run_verify_classifier(weights: str | Path, export_dir: str | Path | None, qat_dir: str | Path | None,
                          dataset: ClassificationDataset, out: str | Path, *, split: str = "valid", threads: int = 2,
                          latency_images: int = 50, batch_size: int = 8, max_drop: float = 0.02,
                          int8_max_drop: float = 0.05) -> dict[str, Any]:
    """Score everything, write `out` (verify.json), then fail if a format's top-1 drifted too far."""
    exports = find_exports(export_dir, qat_dir)
    scores = verify_classifier(weights, exports, dataset, split=split, threads=threads,
                               latency_images=latency_images, batch_size=batch_size)
    summary = report(scores, classifier_split(dataset, split), threads)
    write_json_atomic(Path(out), summary)
    print(format_table(summary), flush=True)  # the stage's console table, as the detector's run_verify prints
    problems = check_drops(summary, max_drop, int8_max_drop)
    if problems:
        raise VerifyError("; ".join(problems))
    return summary
