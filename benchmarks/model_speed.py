"""Model size and speed per RTMDet size: parameters, GFLOPs, GPU fp16 and CPU latency.

    python benchmarks/model_speed.py                    # every size, GPU part when CUDA exists
    python benchmarks/model_speed.py --sizes tiny nano --skip-compile

GPU: batch 1 at --gpu-size (640) in fp16: eager, eager + channels_last, torch.compile
(mode reduce-overhead, i.e. with CUDA graphs) + channels_last, and the same with BatchNorm folded
into the convs (what a deployment runtime does); median of --iters runs timed
with CUDA events after warm-up. CPU: batch 1 at --cpu-size (320), fp32, --cpu-threads (2).
FLOPs come from torch.utils.flop_counter (a multiply-add counts 2); GMACs = GFLOPs / 2 is the
number papers and mmdetection's get_flops report.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from rtmdet.models import SIZES, build_model
from rtmdet.models.fuse import fuse_conv_bn


def count_flops(model: torch.nn.Module, size: int) -> float:
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def gpu_latency_ms(model: torch.nn.Module, size: int, iters: int, channels_last: bool, compile_: bool) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = model.cuda().half().to(memory_format=fmt).eval()
    x = torch.randn(1, 3, size, size, device="cuda").half().to(memory_format=fmt)
    if compile_:
        m = torch.compile(m, mode="reduce-overhead")
    times = []
    with torch.inference_mode():
        for i in range(iters + 30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            m(x)
            end.record()
            torch.cuda.synchronize()
            if i >= 30:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_latency_ms(model: torch.nn.Module, size: int, iters: int, threads: int) -> float:
    torch.set_num_threads(threads)
    m = model.float().cpu().eval()
    x = torch.randn(1, 3, size, size)
    times = []
    with torch.inference_mode():
        for i in range(iters + 5):
            t0 = time.perf_counter()
            m(x)
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--gpu-size", type=int, default=640)
    ap.add_argument("--cpu-size", type=int, default=320)
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cpu-iters", type=int, default=20)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cudnn.benchmark = True
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"CPU threads for the CPU column: {args.cpu_threads}")
    cols = ["size", "params(M)", f"GFLOPs@{args.gpu_size}", f"GMACs@{args.gpu_size}"]
    if cuda:
        cols += ["gpu eager ms", "gpu ch_last ms", "gpu compile ms", "gpu fused+compile ms"]
    if not args.skip_cpu:
        cols += [f"cpu@{args.cpu_size} ms"]
    print(" | ".join(cols))
    for size in args.sizes:
        model = build_model(size, 80).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gflops = count_flops(model, args.gpu_size)
        row = [size, f"{params:.2f}", f"{gflops:.2f}", f"{gflops / 2:.2f}"]
        if cuda:
            row.append(f"{gpu_latency_ms(build_model(size, 80), args.gpu_size, args.iters, False, False):.3f}")
            row.append(f"{gpu_latency_ms(build_model(size, 80), args.gpu_size, args.iters, True, False):.3f}")
            if args.skip_compile:
                row += ["-", "-"]
            else:
                row.append(f"{gpu_latency_ms(build_model(size, 80), args.gpu_size, args.iters, True, True):.3f}")
                fused = fuse_conv_bn(build_model(size, 80).eval())
                row.append(f"{gpu_latency_ms(fused, args.gpu_size, args.iters, True, True):.3f}")
        if not args.skip_cpu:
            row.append(f"{cpu_latency_ms(model, args.cpu_size, args.cpu_iters, args.cpu_threads):.1f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
