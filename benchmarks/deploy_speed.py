"""GPU latency of the inference paths per RTMDet size: eager, CUDA graphs, Inductor, AOTInductor.

    python benchmarks/deploy_speed.py [--pairs nano:192 nano:320 nano:640 tiny:640 s:640 m:640 l:640 x:640]
        [--paths eager-fp32 graph-fp16 autotune-fp16 ...] [--e2e fp16:autotune] [--batch32 fp16:autotune]
        [--weights tiny=parity_tiny.pt] [--photo photo.jpg] [--iters 200] [--warmup 30] [--json out.jsonl]
        [--profile tiny:640] [--profile-e2e fp16:default] [--budget-s 0]

Model only (--paths): a uint8 BGR [1, 3, S, S] batch already on the GPU in, the raw head outputs out:
  eager-fp32, eager-fp16 (autocast): the training model as it is (rtmdet.inference.backends.TorchBackend);
  graph-{fp32,fp16,bf16}: rtmdet.inference.fast (BatchNorm folded, channels_last, the forward
      with its normalization replayed as one CUDA graph; what is timed is the replay);
  inductor-{dtype}, autotune-{dtype}: the same, compiled by TorchInductor first (compile "default"
      or "max-autotune"), then captured in the graph;
  aoti-{dtype}: the folded model with its normalization as an AOTInductor package for CUDA
      (torch.export + aoti_compile_and_package), called through its runner.
Image in, detections out (--e2e DTYPE:COMPILE): rtmdet.inference.gpu.GpuPipeline on a photo that is
  a uint8 HxWx3 tensor on the GPU: letterbox, model, candidate selection and NMS in a graph, the
  final boxes; the post-process as `evaluate` runs it (score 0.001, 300 boxes) and as MMDeploy
  deploys RTMDet (score 0.05, 100 boxes).
Batch 32 (--batch32 DTYPE:COMPILE): the graph replay at batch 32, images per second.

Medians of --iters runs after --warmup, each timed with CUDA events. Weights are random (80 classes)
unless --weights gives a checkpoint for a size (speed does not depend on them, but the number of
candidates that reach NMS does). Compile seconds are printed too. Prints markdown tables; --json
appends one JSON line per measurement. --budget-s stops starting new rows once that many seconds have
passed (0: no limit). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rtmdet.inference.backends import TorchBackend  # noqa: E402
from rtmdet.inference.fast import FastForward, _Inference  # noqa: E402
from rtmdet.inference.postprocess import PostprocessConfig  # noqa: E402
from rtmdet.models import build_model  # noqa: E402

PAIRS = ["nano:192", "nano:320", "nano:640", "tiny:640", "s:640", "m:640", "l:640", "x:640"]
PATHS = ["eager-fp32", "eager-fp16", "graph-fp16", "graph-bf16", "autotune-fp16", "autotune-bf16", "aoti-fp16"]
COMPILE = {"graph": "off", "inductor": "default", "autotune": "max-autotune"}
# RTMDet paper, TensorRT fp16, batch 1 at 640 on an RTX 3090 (the targets).
PAPER_3090_MS = {"tiny": 0.98, "s": 1.22, "m": 1.62, "l": 2.44, "x": 3.10}


def median_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def load(size: str, px: int, weights: dict[str, str]):
    if size in weights:
        from rtmdet.models.checkpoint import load_model

        model, _ = load_model(weights[size], "cpu")
        if model.cfg.image_size != px:
            model.cfg = dataclasses.replace(model.cfg, image_size=px)
        return model.eval()
    torch.manual_seed(0)
    return build_model(size, 80, image_size=px).eval()


def model_only(model, path: str, x: torch.Tensor) -> tuple[Callable[[], object], float]:
    """The timed callable of one --paths entry and its set-up (compile) seconds."""
    kind, dtype = path.split("-")
    t0 = time.perf_counter()
    if kind == "eager":
        backend = TorchBackend(model, "cuda", half=dtype == "fp16")
        backend(x)
        return (lambda: backend(x)), time.perf_counter() - t0
    if kind == "aoti":
        runner = aoti_runner(model, dtype, x)
        runner(x)
        return (lambda: runner(x)), time.perf_counter() - t0
    fast = FastForward(model, "cuda", dtype, compile=COMPILE[kind])
    fast(x)  # compiles and captures
    torch.cuda.synchronize()
    return fast._graph.replay, time.perf_counter() - t0


def aoti_runner(model, dtype: str, x: torch.Tensor):
    import tempfile

    from torch._inductor import aoti_compile_and_package, aoti_load_package

    from rtmdet.export.aoti import build_loadable
    from rtmdet.export.aoti_probe import AotiCrash
    from rtmdet.inference.fast import DTYPES
    from rtmdet.models.fuse import fuse_conv_bn

    net = fuse_conv_bn(model).cuda().to(memory_format=torch.channels_last, dtype=DTYPES[dtype]).eval()
    module = _Inference(net, DTYPES[dtype]).eval()
    path = tempfile.mkdtemp() + "/m.pt2"
    with torch.no_grad():
        program = torch.export.export(module, (x,), strict=False)
    # Loaded in a child first (rtmdet's export check, with its compiler fallback): a package whose
    # loading crashes (every package built with the H200 machine's CXX, /opt/gcc/bin/g++, under
    # torch 2.11) is built again with the next compiler; a crash with every one fails this row.

    def build(cxx):
        with torch.no_grad():
            aoti_compile_and_package(program, package_path=path, inductor_configs={"cpp.cxx": (cxx,)} if cxx else {})

    def loads():
        child = subprocess.run([sys.executable, "-c", "import sys; from torch._inductor import aoti_load_package; "
                                "aoti_load_package(sys.argv[1])", path], capture_output=True, text=True)
        if child.returncode < 0:
            raise AotiCrash(f"torch's AOTInductor runtime crashed ({signal.Signals(-child.returncode).name}) "
                            "loading the package")
        if child.returncode:
            raise RuntimeError(f"the AOTInductor package did not load: {(child.stderr.strip().splitlines() or ['?'])[-1]}")

    build_loadable(build, loads, "cuda")
    return aoti_load_package(path)


# (score_thr, max_per_img): mmdetection's test_cfg (what `evaluate` uses) and MMDeploy's deployed
# RTMDet (score_threshold 0.05, keep_top_k 100).
E2E_SETTINGS = ((0.001, 300), (0.05, 100))


def e2e(model, dtype: str, compile_: str, photo: torch.Tensor, iters: int, warmup: int) -> list[dict]:
    """GpuPipeline per post-process setting: the whole call, and its first graph's replay alone;
    the kept detections, which NMS stage answered, and whether they equal the eager post-process
    of the same head outputs."""
    from rtmdet.inference.gpu import GpuPipeline
    from rtmdet.inference.postprocess import postprocess_batch

    rows = []
    for thr, max_per_img in E2E_SETTINGS:
        t0 = time.perf_counter()
        cfg = PostprocessConfig(score_thr=thr, max_per_img=max_per_img)
        pipe = GpuPipeline(model, "cuda", dtype, compile_, cfg)
        boxes, scores, labels = pipe(photo)
        setup = time.perf_counter() - t0
        ms = median_ms(lambda: pipe(photo), iters, warmup)
        run = next(iter(pipe._graphs.values()))
        graph_ms = median_ms(run.graphs[0].replay, iters, warmup)
        boxes, scores, labels = pipe(photo)
        exact = [bool(out[-1][1]) for out in (run.outputs[0][2], *run.outputs[1:])]
        stage = exact.index(True) + 1 if True in exact else "eager"
        cls, reg = run.outputs[0][:2]
        want = postprocess_batch([c.float() for c in cls], [r.float() for r in reg], pipe.strides,
                                 (pipe.size, pipe.size), [run.info.scale_wh], [run.info.ori_hw], cfg)[0]
        rows.append(dict(score_thr=thr, max_per_img=max_per_img, ks=list(pipe.ks), ms=ms, graph_ms=graph_ms,
                         detections=int(boxes.shape[0]), stage=stage,
                         vs_eager_postprocess=compare((boxes, scores, labels), want), setup_s=setup))
    return rows


def compare(got, want, px: float = 1e-3, score_tol: float = 1e-6) -> str:
    """How two (boxes, scores, labels) results relate, rows matching when their labels are equal,
    scores within score_tol (Inductor's fused sigmoid may round a last bit differently from eager)
    and boxes within px: "equal" (row for row), "equal up to the order of tied scores", "equal up
    to tie-breaking" (every unmatched row scores the same as another row or as the last kept one:
    greedy NMS over equal scores, and max_per_img cutting a tie, may keep either box; half precision
    makes such ties common), else "DIFFERENT"."""
    def rows(result):
        boxes, scores, labels = (t.double().cpu() for t in result)
        return [(s, l, b) for s, l, b in zip(scores.tolist(), labels.tolist(), boxes.tolist())]

    def same(a, b):
        return a[1] == b[1] and abs(a[0] - b[0]) <= score_tol and max(abs(x - y) for x, y in zip(a[2], b[2])) <= px

    a, b = rows(got), rows(want)
    if len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)):
        return "equal"
    unmatched = [x for x in a if not any(same(x, y) for y in b)] + [y for y in b if not any(same(x, y) for x in a)]
    if len(a) == len(b) and not unmatched:
        return "equal up to the order of tied scores"
    scores = [r[0] for r in a + b]
    last = min(r[0] for r in b) if b else 0.0

    def tied(r):
        return abs(r[0] - last) <= score_tol or sum(abs(r[0] - t) <= score_tol for t in scores) > 2

    if len(a) == len(b) and all(tied(r) for r in unmatched):
        return f"equal up to tie-breaking ({len(unmatched) // 2} of {len(a)} rows picked among equal scores)"
    return f"DIFFERENT ({sum(1 for r in unmatched if not tied(r))} rows without a tie)"


def profile_e2e(model, dtype: str, compile_: str, photo: torch.Tensor, thr: float = 0.05, max_per_img: int = 100) -> None:
    """GpuPipeline's steps one by one without the graph, under profiler ranges: the kernels'
    summed GPU time per step (letterbox, model, selection and NMS compiled as in the pipeline, and
    the selection and the NMS eager)."""
    from torch.profiler import ProfilerActivity, profile as prof, record_function

    from rtmdet.inference.gpu import GpuPipeline, letterbox_tensor
    from rtmdet.inference.postprocess_static import nms_in_graph, select_candidates

    cfg = PostprocessConfig(score_thr=thr, max_per_img=max_per_img)
    pipe = GpuPipeline(model, "cuda", dtype, compile_, cfg)
    pipe(photo)
    run = next(iter(pipe._graphs.values()))
    size = pipe.size

    def steps():
        with record_function("letterbox"):
            letterbox_tensor(photo, size, out=run.canvas)
        with record_function("model"):
            cls, reg = pipe.fast.forward(run.canvas)[:2]
        with record_function("select+nms (as in the pipeline)"):
            pipe._posts[0](cls, reg, run.inv_scale, run.ori_hw)
        with record_function("select (eager)"):
            found = select_candidates(cls, reg, pipe.strides, (size, size), run.inv_scale, cfg, k=pipe.ks[0])
        with record_function("nms_in_graph (eager)"):
            nms_in_graph(found, run.ori_hw, cfg)

    steps = torch.inference_mode()(steps)  # the pipeline's buffers are inference tensors
    for _ in range(3):
        steps()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            steps()
        torch.cuda.synchronize()
    print(f"\nprofile e2e {dtype} compile={compile_} score {thr}, {max_per_img} boxes, K {pipe.ks[0]}: ms per call by "
          "step (kernels: their summed GPU time; span: the range on the GPU's timeline, launch gaps included)")
    for e in p.key_averages():
        if e.key in ("letterbox", "model", "select+nms (as in the pipeline)", "select (eager)", "nms_in_graph (eager)"):
            what = "kernels" if e.device_type == torch.autograd.DeviceType.CPU else "span"
            print(f"  {e.device_time_total / e.count / 1000:.4f} ms  {e.key} ({what})")


def profile(model, dtype: str, compile_: str, x: torch.Tensor) -> None:
    """Per forward without a graph: the kernels, their count and their summed GPU time (the
    replay cannot beat that sum)."""
    from torch.profiler import ProfilerActivity, profile as prof

    fast = FastForward(model, "cuda", dtype, graphs=False, compile=compile_)
    for _ in range(3):
        fast(x)
    torch.cuda.synchronize()
    runs = 5
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(runs):
            fast.forward(x)
        torch.cuda.synchronize()
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / runs / 1000
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    print(f"\nprofile {dtype} compile={compile_}: {len(kernels) / runs:.0f} kernels per forward, "
          f"{total:.3f} ms of kernel time")
    for name, ts in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"  {sum(ts) / runs / 1000:.4f} ms  x{len(ts) // runs:<3d} {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=PAIRS, help="SIZE:PIXELS")
    p.add_argument("--paths", nargs="*", default=PATHS)
    p.add_argument("--e2e", nargs="*", default=[], help="DTYPE:COMPILE, e.g. fp16:max-autotune")
    p.add_argument("--batch32", nargs="*", default=[], help="DTYPE:COMPILE")
    p.add_argument("--weights", nargs="*", default=[], help="SIZE=CHECKPOINT")
    p.add_argument("--photo", help="a photo for --e2e (default: a 480x640 gradient)")
    p.add_argument("--profile", nargs="*", default=[], help="SIZE:PIXELS to profile (graph-fp16, inductor-fp16)")
    p.add_argument("--profile-e2e", nargs="*", default=[], help="DTYPE:COMPILE: GpuPipeline's steps profiled")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--json", help="append JSON lines here")
    p.add_argument("--budget-s", type=float, default=0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("deploy_speed: needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    weights = dict(w.split("=", 1) for w in args.weights)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
    torch.backends.cudnn.benchmark = True

    def record(**row) -> None:
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - started > args.budget_s

    if args.photo:
        import cv2

        photo = torch.from_numpy(cv2.imread(args.photo)).cuda()
    else:
        photo = torch.arange(480 * 640 * 3, device="cuda").reshape(480, 640, 3).remainder(251).to(torch.uint8)
    table: dict[tuple[str, str], dict[str, float]] = {}
    for pair in args.pairs:
        size, px = pair.split(":")
        model = load(size, int(px), weights)
        x = torch.randint(0, 256, (1, 3, int(px), int(px)), dtype=torch.uint8, device="cuda")
        if pair in args.profile:
            for dtype, comp in (("fp16", "off"), ("fp16", "default")):
                profile(model, dtype, comp, x)
        for path in args.paths:
            if over_budget():
                break
            try:
                fn, setup = model_only(model, path, x)
                ms = median_ms(fn, args.iters, args.warmup)
            except Exception as exc:  # a benchmark row that fails is reported, the others go on
                record(size=size, px=int(px), path=path, error=str(exc).splitlines()[0][:200])
                continue
            table.setdefault((size, px), {})[path] = ms
            record(size=size, px=int(px), path=path, ms=round(ms, 4), setup_s=round(setup, 1))
        for spec in args.e2e:
            if over_budget():
                break
            dtype, comp = spec.split(":")
            try:
                rows = e2e(model, dtype, comp, photo, args.iters, args.warmup)
            except Exception as exc:  # reported, the other rows go on
                record(size=size, px=int(px), path=f"e2e-{dtype}-{comp}", error=str(exc).splitlines()[0][:300])
                continue
            for row in rows:
                table.setdefault((size, px), {})[f"e2e-{dtype}-{comp}@{row['score_thr']}/{row['max_per_img']}"] = row["ms"]
                record(size=size, px=int(px), path=f"e2e-{dtype}-{comp}", **row)
        for spec in args.profile_e2e:
            dtype, comp = spec.split(":")
            profile_e2e(model, dtype, comp, photo)
        for spec in args.batch32:
            if over_budget():
                break
            dtype, comp = spec.split(":")
            xb = torch.randint(0, 256, (32, 3, int(px), int(px)), dtype=torch.uint8, device="cuda")
            fast = FastForward(model, "cuda", dtype, compile=comp)
            fast(xb)
            ms = median_ms(fast._graph.replay, max(args.iters // 4, 50), 10)
            table.setdefault((size, px), {})[f"b32-{dtype}-{comp} img/s"] = 32e3 / ms
            record(size=size, px=int(px), path=f"batch32-{dtype}-{comp}", ms=round(ms, 3), images_per_s=round(32e3 / ms))
        del model
        torch.cuda.empty_cache()
    columns = sorted({c for row in table.values() for c in row}, key=lambda c: (not c in args.paths, c))
    print(f"\n| model | px | paper 3090 ms | {' | '.join(columns)} |")
    print("|---|---|---|" + "---|" * len(columns))
    for (size, px), row in table.items():
        paper = PAPER_3090_MS.get(size, "-") if px == "640" else "-"
        cells = [f"{row[c]:.3f}" if c in row and "img/s" not in c else (f"{row[c]:.0f}" if c in row else "-")
                 for c in columns]
        print(f"| {size} | {px} | {paper} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
