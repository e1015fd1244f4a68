"""Training-pipeline throughput: images/s of the DataLoader for stage 1 and stage 2 at 320 and 640.

    python benchmarks/data_speed.py [ROOT] [--workers 2] [--batch 32] [--batches 20] [--size tiny]

ROOT defaults to ../shared/datasets/facemask (relative to the repository). The first batch of
every setting is not timed (worker start-up); the loader then runs `--batches` batches,
wrapping into further epochs if needed. Nothing is sent to a GPU: this is the CPU side alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout, installed or not

from rtmdet.data.coco import load_dataset
from rtmdet.data.loader import TrainDataset, build_dataloader, set_epoch
from rtmdet.data.pipeline import PipelineConfig


def measure(records, imgsz: int, stage: int, workers: int, batch: int, batches: int, size: str) -> float:
    """Images per second over `batches` batches after one untimed batch."""
    loader = build_dataloader(
        TrainDataset(records, PipelineConfig.for_size(size, imgsz)), batch, num_workers=workers, seed=0
    )
    epoch, done, images, start = 0, -1, 0, 0.0
    while done < batches:
        set_epoch(loader, epoch, stage)
        for b in loader:
            done += 1
            if done == 0:
                start = time.perf_counter()  # worker start-up and the first batch are excluded
            else:
                images += len(b["image_ids"])
            if done == batches:
                break
        epoch += 1
    return images / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=REPO.parent / "shared" / "datasets" / "facemask")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting (default: 20)")
    parser.add_argument("--size", default="tiny", help="recipe of model size nano/tiny/s/m/l/x (default: tiny)")
    parser.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    args = parser.parse_args()

    data = load_dataset(args.root)
    records = data.splits["train"].records
    print(f"dataset {args.root} ({len(records)} train images), recipe {args.size}, batch {args.batch}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs, {args.batches} timed batches")
    print(f"{'imgsz':>6} {'stage':>6} {'images/s':>10}")
    for imgsz in args.imgsz:
        for stage in (1, 2):
            rate = measure(records, imgsz, stage, args.workers, args.batch, args.batches, args.size)
            print(f"{imgsz:>6} {stage:>6} {rate:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
