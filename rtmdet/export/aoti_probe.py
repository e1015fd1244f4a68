"""Run an AOTInductor package in a process of its own: the export's check, kept apart from the
process that compiled the package.

    python -m rtmdet.export.aoti_probe PACKAGE INPUTS.npy OUTPUTS.npz DEVICE

INPUTS: float32 or uint8 [N, 3, S, S] canvases; OUTPUTS gets the package's outputs for image i as
`out_{i}_{j}` (j: the output's position). A package that cannot load is one line on stderr and
exit status 2. Why a process of its own: a crash in torch's loader or in the compiled code (on an
H200 machine with torch 2.11, every package built with its CXX, /opt/gcc/bin/g++, died of a
segmentation fault inside the generated wrapper's std::regex as it loaded) is then an AotiCrash,
which the export answers by building with another compiler (rtmdet.export.aoti), instead of
killing the export.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from rtmdet.errors import first_line
from rtmdet.export import ExportError


class AotiCrash(ExportError):
    """torch's AOTInductor runtime died (a signal) loading or running the package."""


def run_probe(package: str | Path, device: str, images: np.ndarray, timeout_s: float = 600) -> list[list[np.ndarray]]:
    """Per image, the package's outputs, computed by `python -m rtmdet.export.aoti_probe`; a
    one-line ExportError when that process fails, AotiCrash when it dies of a signal."""
    root = str(Path(__file__).resolve().parents[2])  # the rtmdet package's parent, for the child's imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="rtmdet-aoti-probe-") as tmp:
        inputs, outputs = Path(tmp) / "inputs.npy", Path(tmp) / "outputs.npz"
        np.save(inputs, images)
        command = [sys.executable, "-m", "rtmdet.export.aoti_probe", str(package), str(inputs), str(outputs), device]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise ExportError(f"{package}: running the AOTInductor package took over {timeout_s:.0f} s") from None
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            raise AotiCrash(f"{package}: torch's AOTInductor runtime crashed ({name}) loading or running the "
                              f"package compiled for {device}")
        if proc.returncode:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise ExportError(f"{package}: the AOTInductor package did not run: {lines[-1] if lines else 'no message'}")
        with np.load(outputs) as saved:
            per_image = len(saved.files) // len(images)  # every image has the package's outputs
            return [[saved[f"out_{i}_{j}"] for j in range(per_image)] for i in range(len(images))]


def main(argv: list[str]) -> int:
    package, inputs, outputs, device = argv
    import torch

    from rtmdet.errors import RTMDetError
    from rtmdet.inference.backends import load_aoti_package

    try:
        runner = load_aoti_package(package, device)
    except RTMDetError as exc:
        print(first_line(exc), file=sys.stderr)
        return 2
    images = np.load(inputs)
    saved = {}
    for i in range(len(images)):
        outs = runner(torch.from_numpy(images[i : i + 1]).float().to(device))
        saved.update({f"out_{i}_{j}": out.cpu().numpy() for j, out in enumerate(outs)})
    np.savez(outputs, **saved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
