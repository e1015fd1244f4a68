"""rtmdet_run's libtorch and post-process path against Python on one AOTInductor package, on a
machine without OpenCV's development files (the H200 machine), per C++ compiler.

    python benchmarks/aoti_cpp_check.py --package exports/best.pt2 --photo photo.jpg \
        [--cxx /usr/bin/g++ /opt/gcc/bin/g++] [--score-thr 0.7] [--repeat 200]

Builds benchmarks/aoti_cpp/canvas_run.cpp with cpp/src's model, sidecar, json and post-process
sources (a stand-in header for OpenCV's cv::Mat) once per compiler, resizes the photo to the
package's canvas (Detector's letterbox of an S x S photo is the identity), runs each build and
Detector.from_export on that canvas, and prints one JSON line per compiler: the detection counts
of both, whether the labels are equal, the largest box (px) and score differences, the load time
and the median model call (canvas in, outputs back on the host); a build that crashes prints its
signal. The whole rtmdet_run (OpenCV's decode and letterbox too) is tested by tests/test_aoti_cpp.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SOURCES = ["model.cpp", "sidecar.cpp", "json.cpp", "postprocess.cpp"]


def build(cxx: str, out: Path) -> str | None:
    """Compile canvas_run with `cxx`; None, or the compiler's last lines."""
    root = Path(torch.__file__).parent
    cmd = [cxx, "-O2", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-ffp-contract=off", "-isystem", str(root / "include"),
           "-isystem", str(root / "include/torch/csrc/api/include"),
           "-I", str(REPO / "benchmarks/aoti_cpp/stub"), "-I", str(REPO / "cpp/src"),
           str(REPO / "benchmarks/aoti_cpp/canvas_run.cpp"), *[str(REPO / "cpp/src" / s) for s in SOURCES],
           "-Wl,--allow-shlib-undefined", "-Wl,--no-as-needed", f"-L{root / 'lib'}", "-ltorch", "-ltorch_cpu",
           "-lc10", f"-Wl,-rpath,{root / 'lib'}", "-pthread", "-ldl", "-o", str(out)]
    if shutil.which(cxx) is None:
        return f"{cxx}: compiler not found"
    done = subprocess.run(cmd, capture_output=True, text=True)
    return None if done.returncode == 0 else "\n".join(done.stderr.strip().splitlines()[-5:])


def compare(cpp: dict, py) -> dict:
    found = np.array(cpp["detections"], dtype=np.float64).reshape(-1, 6)
    row = {"n_cpp": len(found), "n_python": len(py), "load_ms": cpp["load_ms"], "run_median_ms": cpp["run_median_ms"]}
    if len(found) == len(py):
        row["labels_equal"] = bool(np.array_equal(found[:, 0].astype(int), py.labels))
        if len(found):
            row["max_box_px"] = float(np.abs(found[:, 2:] - py.boxes).max())
            row["max_score"] = float(np.abs(found[:, 1] - py.scores).max())
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", required=True, type=Path, help="a .pt2 from rtmdet export --format aoti")
    p.add_argument("--photo", required=True, type=Path)
    p.add_argument("--cxx", nargs="+", default=[os.environ.get("CXX") or "g++"], help="C++ compilers to build with")
    p.add_argument("--score-thr", type=float, default=0.3)
    p.add_argument("--repeat", type=int, default=200, help="timed model calls after the first")
    args = p.parse_args()

    from rtmdet.inference import Detector

    size = json.loads(args.package.with_suffix(".json").read_text())["image_size"]
    photo = cv2.imread(str(args.photo))
    if photo is None:
        sys.exit(f"{args.photo}: not a readable image")
    canvas = np.ascontiguousarray(cv2.resize(photo, (size, size), interpolation=cv2.INTER_LINEAR))
    python = Detector.from_export(args.package, score_thr=args.score_thr)(canvas)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "canvas.bin"
        raw.write_bytes(canvas.tobytes())
        for i, cxx in enumerate(args.cxx):
            exe = Path(tmp) / f"canvas_run_{i}"
            row: dict = {"cxx": cxx}
            failed = build(cxx, exe)
            if failed:
                print(json.dumps({**row, "build_failed": failed}), flush=True)
                continue
            run = subprocess.run([str(exe), str(args.package), str(raw), str(args.score_thr), str(args.repeat)],
                                 capture_output=True, text=True)
            if run.returncode < 0:
                row["crashed"] = signal.Signals(-run.returncode).name
            elif run.returncode:
                row["error"] = run.stderr.strip()
            else:
                row.update(compare(json.loads(run.stdout), python))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
