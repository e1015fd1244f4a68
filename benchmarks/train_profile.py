"""Where a training step's time goes, and how fast steady-state training runs, on real data.

    python benchmarks/train_profile.py --data ROOT [--size tiny] [--imgsz 320] [--batch 32] [--workers 16]
        [--warmup 25] [--steps 40] [--set train.compile=false ...] [--json OUT.json] [--trace OUT.trace.json]
    torchrun --nproc-per-node 2 benchmarks/train_profile.py ...      # the same, per rank, on two GPUs

It builds the trainer's own run (rtmdet.training.trainer._Run, the recipe of
benchmarks/peer_yolo.py) and drives its real step on stage-1 (mosaic) batches:

1. warm-up steps (cudnn autotuning, torch.compile), then `--steps` steps timed as training runs
   them (no extra syncs): ms per step, images/s (per rank and all ranks), time waiting for data;
2. the same number of steps with every phase synchronized (data, h2d, forward, assigner, losses,
   backward, optimizer, ema, host sync; a compiled step reports forward+loss as one phase, a
   graphed step (compile_mode graph*) the whole step as one):
   each phase's own ms per step;
3. a few steps under torch.profiler: CUDA launches (kernels, or graphs) and host syncs per step;
4. validation of the valid split three times (the first fills caches): seconds, split into
   inference (images, model, post-process) and COCO scoring.

Run it with PYTHONPATH pointing at another checkout to profile that code (the phases are the
trainer's `self.phase` calls). Prints one table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # a PYTHONPATH checkout comes first

from rtmdet.config import DataParams, ModelParams, parse_section  # noqa: E402
from rtmdet.data.loader import set_epochs  # noqa: E402
from rtmdet.training import distributed as dist_utils  # noqa: E402
from rtmdet.training.trainer import _Run  # noqa: E402

RECIPE = {"lr": 0.016, "base_batch_size": 32, "warmup_iters": 300, "stage2_epochs": 20, "amp": "auto",
          "channels_last": True, "epochs": 100, "ema": True}
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--size", default="tiny")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=32, help="images per GPU")
    p.add_argument("--workers", type=int, default=8, help="loader workers per GPU")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--val-runs", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--trace", type=Path, default=None, help="chrome trace of the profiled steps (rank 0)")
    p.add_argument("--label", default="")
    return p.parse_args()


class Driver:
    """Steps of the trainer's run on batches of stage 1, epoch after epoch as needed."""

    def __init__(self, run: _Run):
        self.run = run
        set_epochs(run.loader, 0, 10_000, stage2_from=10_000)  # as the trainer: one pass over the epochs
        self.batches = iter(run.loader)
        self.data_wait = 0.0

    def next_batch(self):
        start = time.perf_counter()
        batch = next(self.batches)
        self.data_wait += time.perf_counter() - start
        return batch

    def step(self) -> None:
        run = self.run
        with run.phase("data"):
            batch = self.next_batch()
        run._step(batch)
        run.global_iter += 1
        run.pending += 1
        if run.pending == run.p.log_interval:
            with run.phase("host sync"):
                run.window[: run.pending].tolist()  # what the trainer's _sync reads back
            run.pending = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    args = parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = dist_utils.setup("auto")
    overrides = {"batch_size": args.batch, "workers": args.workers, "seed": 0, "device": "auto"}
    for item in args.set:
        key, _, value = item.partition("=")
        import yaml

        overrides[key.removeprefix("train.")] = yaml.safe_load(value)
    train_p = parse_section("train", {**RECIPE, **overrides})
    out = Path(tempfile.mkdtemp(prefix="train_profile-"))
    run = _Run(DataParams(root=str(args.data)), ModelParams(size=args.size, imgsz=args.imgsz), train_p, out,
               None, None, info, progress=False)
    run._build(None)
    run.pending = 0
    driver = Driver(run)
    dev = info.device
    t0 = time.perf_counter()
    for i in range(args.warmup):
        driver.step()
        if i < 3 or i == args.warmup - 1:
            sync(dev)
            print(f"warm-up step {i + 1}: {time.perf_counter() - t0:.1f} s", flush=True)
    sync(dev)
    warmup_s = time.perf_counter() - t0

    # The steady window: only replays of graphs already captured. A batch needing a new box
    # bucket runs eagerly (warm-up, capture) on every rank; such a window is measured again.
    graphs = run.graphs
    for windows in range(1, 6):
        driver.data_wait = 0.0
        eager = graphs.eager_steps if graphs is not None else 0
        dist_utils.barrier(info)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            driver.step()
        sync(dev)
        steady_s = time.perf_counter() - t0
        if graphs is None or graphs.eager_steps == eager:
            break
    step_ms = 1000 * steady_s / args.steps
    data_ms = 1000 * driver.data_wait / args.steps

    run.phase.enabled = True
    for _ in range(args.steps):
        driver.step()
    phases = {k: 1000 * v[0] / args.steps for k, v in run.phase.totals.items()}
    run.phase.enabled = False

    kernels = syncs = None
    if dev.type == "cuda" and args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile_steps):
                driver.step()
            sync(dev)
        counts = {e.key: e.count for e in prof.key_averages()}
        kernels = sum(counts.get(k, 0) for k in LAUNCHES) / args.profile_steps
        syncs = sum(counts.get(k, 0) for k in SYNC_CALLS) / args.profile_steps
        if args.trace and info.is_main:
            prof.export_chrome_trace(str(args.trace))

    val = []
    if info.is_main:
        for _ in range(args.val_runs):
            sync(dev)
            t0 = time.perf_counter()
            metrics = run._validate()
            sync(dev)
            total = time.perf_counter() - t0
            parts = run.validator.seconds  # inference (= load + model + postprocess) and scoring
            val.append({"seconds": total, **{k: parts.get(k) for k in ("inference", "model", "postprocess", "scoring")},
                        "mAP": metrics["mAP"]})
    dist_utils.barrier(info)
    run.close()
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    result = {
        "label": args.label, "size": args.size, "imgsz": args.imgsz, "batch_per_gpu": args.batch,
        "world_size": info.world_size, "workers": args.workers, "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda" else "cpu", "torch": torch.__version__, "train": {k: getattr(train_p, k) for k in
        ("compile", "compile_mode", "sync_bn", "amp", "channels_last") if hasattr(train_p, k)},
        "warmup_s": warmup_s, "step_ms": step_ms, "steady_windows": windows, "steps": args.steps, "data_wait_ms": data_ms,
        "images_per_s_per_gpu": args.batch / (step_ms / 1000), "images_per_s": info.world_size * args.batch / (step_ms / 1000),
        "phases_ms": phases, "kernels_per_step": kernels, "syncs_per_step": syncs, "validation": val,
        "peak_mem_gib": peak,
    }
    if info.is_main:
        print(format_result(result), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
    dist_utils.cleanup(info)
    return 0


def format_result(r: dict) -> str:
    lines = [f"== {r['label'] or 'run'}: {r['size']}@{r['imgsz']}, {r['batch_per_gpu']}/GPU x {r['world_size']}, "
             f"{r['device']}, torch {r['torch']}, {r['train']}",
             f"steady ({r.get('steady_windows', 1)} window(s) of {r.get('steps', '?')} steps, the last with no new graph): "
             f"{r['step_ms']:.1f} ms/step, {r['images_per_s']:.0f} img/s "
             f"({r['images_per_s_per_gpu']:.0f}/GPU), data wait {r['data_wait_ms']:.1f} ms/step; "
             f"warm-up {r['warmup_s']:.1f} s; peak {r['peak_mem_gib'] or 0:.1f} GiB",
             f"kernels/step {r['kernels_per_step']}, host syncs/step {r['syncs_per_step']}",
             "| phase | ms/step (synchronized) |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["phases_ms"].items()]
    lines.append(f"| sum | {sum(r['phases_ms'].values()):.2f} |")
    for i, v in enumerate(r["validation"]):
        part = ", ".join(f"{k} {'?' if v.get(k) is None else format(v[k], '.2f')}"
                         for k in ("inference", "model", "postprocess", "scoring"))
        lines.append(f"validation {i + 1}: {v['seconds']:.2f} s ({part}), mAP {v['mAP']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
