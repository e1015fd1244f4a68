"""GPU latency of the torch inference paths per RTMDet size: eager against the fast path.

    python benchmarks/deploy_speed.py [--pairs nano:192 nano:640 tiny:640 s:640 m:640 l:640 x:640]
        [--iters 200] [--warmup 20] [--batch 1]

Model only: a uint8 BGR batch already on the GPU in, the raw head outputs (float32) out, through
rtmdet.inference.backends.TorchBackend: eager fp32, eager under fp16 autocast, and the fast path
(BatchNorm folded, channels_last, the forward replayed as a CUDA graph; rtmdet.inference.fast) in
fp16 and bf16. Median milliseconds of --iters runs after --warmup, each timed with CUDA events.
Random weights with 80 classes (speed does not depend on them). Prints a markdown table.
Needs a CUDA GPU. (Issue 17 asks for more: image-in/detections-out, AOTInductor, batch 32.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rtmdet.inference.backends import TorchBackend  # noqa: E402
from rtmdet.models import build_model  # noqa: E402

PATHS = {
    "eager fp32": dict(),
    "eager fp16 autocast": dict(half=True),
    "fast fp16": dict(fast=True, dtype="fp16"),
    "fast bf16": dict(fast=True, dtype="bf16"),
}


def median_ms(fn, x: torch.Tensor, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["nano:192", "nano:640", "tiny:640", "s:640", "m:640", "l:640",
                                                  "x:640"], help="SIZE:PIXELS")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("deploy_speed: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"| model | px | {' | '.join(f'{name} ms' for name in PATHS)} |")
    print("|---|---|" + "---|" * len(PATHS))
    for pair in args.pairs:
        size, px = pair.split(":")
        model = build_model(size, 80, image_size=int(px)).eval()
        x = torch.randint(0, 256, (args.batch, 3, int(px), int(px)), dtype=torch.uint8, device="cuda")
        row = [median_ms(TorchBackend(model, "cuda", **kw), x, args.iters, args.warmup) for kw in PATHS.values()]
        print(f"| {size} | {px} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
