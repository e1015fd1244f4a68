"""Steady-state training speed on 1 and N GPUs, and what it means for a COCO-sized run.

    python benchmarks/train_speed.py --data ROOT [--gpus 2] [--configs tiny:320:32 tiny:640:32 s:640:32 m:640:32]
        [--steps 30] [--warmup 25] [--out DIR] [--set train.KEY=VALUE ...]
    python benchmarks/train_speed.py --table DIR/*.json        # the table again from saved runs

Each (size:imgsz:batch per GPU) runs benchmarks/train_profile.py once on one GPU and once on
--gpus GPUs (torchrun, the same per-GPU batch: weak scaling), each in its own process, and reads
its steady-state images/s, validation seconds (the second validation: caches warm), peak GPU
memory. The projection: COCO train2017 (118,287 images) x 300 epochs on 8 GPUs, at the one-GPU
rate x 8 x the scaling efficiency measured from 1 to --gpus GPUs (an assumption: efficiency from
2 to 8 GPUs on one host is usually a little lower), training steps only (no validation, no
compile warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COCO_IMAGES, COCO_EPOCHS, COCO_GPUS = 118_287, 300, 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=["tiny:320:32", "tiny:640:32", "s:640:32", "m:640:32"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/train_speed"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--table", nargs="+", type=Path, help="print the table of saved result files")
    return p.parse_args()


def run_one(args: argparse.Namespace, size: str, imgsz: int, batch: int, gpus: int) -> dict | None:
    name = f"{size}_{imgsz}_b{batch}_g{gpus}"
    result = args.out / f"{name}.json"
    cmd = [str(HERE / "train_profile.py"), "--data", str(args.data), "--size", size, "--imgsz", str(imgsz),
           "--batch", str(batch), "--workers", str(args.workers), "--warmup", str(args.warmup), "--steps",
           str(args.steps), "--profile-steps", "0", "--val-runs", "2", "--json", str(result), "--label", name]
    for item in args.set:
        cmd += ["--set", item]
    launcher = [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node", str(gpus)]
    log = args.out / f"{name}.log"
    print(f"running {name} ... log {log}", flush=True)
    with log.open("w") as f:
        rc = subprocess.run(launcher + cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0 or not result.exists():
        print(f"{name} FAILED (exit {rc}):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
        return None
    return json.loads(result.read_text())


def table(results: list[dict]) -> str:
    by_config: dict[tuple, dict[int, dict]] = {}
    for r in results:
        by_config.setdefault((r["size"], r["imgsz"], r["batch_per_gpu"]), {})[r["world_size"]] = r
    lines = ["| model | batch/GPU | 1 GPU img/s | N GPUs img/s (scaling) | val s (1 GPU) | peak GiB | "
             f"COCO {COCO_EPOCHS} epochs on {COCO_GPUS} GPUs |", "|---|---|---|---|---|---|---|"]
    for (size, imgsz, batch), runs in by_config.items():
        one = runs.get(1)
        many = max((n for n in runs if n > 1), default=None)
        ips1 = one["images_per_s"] if one else None
        scale = runs[many]["images_per_s"] / (many * ips1) if many and ips1 else None
        multi = f"{runs[many]['images_per_s']:.0f} on {many} ({scale:.2f})" if many and scale else "-"
        val = f"{one['validation'][-1]['seconds']:.2f}" if one and one["validation"] else "-"
        hours = "-"
        if ips1:
            rate = ips1 * COCO_GPUS * (scale if scale else 1.0)
            hours = f"{COCO_IMAGES * COCO_EPOCHS / rate / 3600:.1f} h"
        peak = f"{one['peak_mem_gib']:.1f}" if one and one.get("peak_mem_gib") else "-"
        lines.append(f"| {size}@{imgsz} | {batch} | {ips1 or 0:.0f} | {multi} | {val} | {peak} | {hours} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.table:
        print(table([json.loads(p.read_text()) for p in args.table]))
        return 0
    if args.data is None:
        raise SystemExit("--data is required (a Roboflow COCO export)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for config in args.configs:
        size, imgsz, batch = config.split(":")
        for gpus in sorted({1, args.gpus}):
            r = run_one(args, size, int(imgsz), int(batch), gpus)
            if r:
                results.append(r)
    print(table(results))
    (args.out / "train_speed.md").write_text(table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
