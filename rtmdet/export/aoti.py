"""AOTInductor export: torch.export + an AOTInductor package (`.pt2`) that runs without Python.

The package holds the same graph as the ONNX file (rtmdet.export.onnx's wrapper: normalization
inside, raw per-level outputs, distances in stride units), compiled ahead of time for one device:

  input:   `images` [1, 3, S, S] float32 BGR pixels 0..255 (static shape: one image per call)
  outputs: positional, in the sidecar's `outputs` order: `cls_s{s}` [1, H*W, num_classes] class
           logits, then `reg_s{s}` [1, H*W, 4] (left, top, right, bottom) in stride units

The `.json` sidecar is the ONNX one plus `outputs`, `device` and the post-process defaults
(`postprocess`), with the letterbox and post-process spelled out step by step in `conventions`,
so that a runtime in another language (cpp/, libtorch's AOTIModelPackageLoader) follows it.
Python runs it through rtmdet.inference.backends.AotiBackend. Box models only for now.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from rtmdet.errors import first_line
from rtmdet.export import ExportError
from rtmdet.export.aoti_probe import AotiCrash
from rtmdet.export.onnx import _check_size, _wrapper, all_output_names, base_meta, fixed_inputs, torch_reference
from rtmdet.export.sidecar import ExportMeta, write_meta

if TYPE_CHECKING:
    from rtmdet.models.detector import RTMDet

log = logging.getLogger(__name__)
T = TypeVar("T")

DEVICES = ("cpu", "cuda")
# The CPU kernels' thread count follows the runtime (OMP_NUM_THREADS, at::set_num_threads) instead
# of the exporting machine's core count, which Inductor bakes in by default.
INDUCTOR = {"cpp.dynamic_threads": True}
# The check's tolerance, relative to each output's largest magnitude. On CUDA, cuDNN runs the
# convolutions in TF32 (torch's default for convolutions, and the runtime's) against a float32
# reference on the CPU: ~3e-3 of the logits' range on RTMDet-tiny; a wrong graph is off by whole units.
RTOL = {"cpu": 2e-3, "cuda": 1e-2}


@dataclass
class AotiExport:
    """What export_aoti wrote and how close it is to torch."""

    path: Path
    meta: ExportMeta
    max_diff: dict[str, float]


def export_aoti(model: "RTMDet", path: str | Path, *, classes: list[str] | None = None,
                category_ids: list[int] | None = None, source: dict | None = None,
                device: str = "cpu") -> AotiExport:
    """Compile `model` into an AOTInductor package at `path` (+ `path.json` sidecar) for `device`
    (cpu or cuda), checked against torch on fixed canvases before it is written."""
    import torch

    path = Path(path)
    if model.cfg.task != "detect":
        raise ExportError(f"an RTMDet {model.cfg.task} model: the aoti format exports box models (task detect) "
                          "only so far; use --format onnx or tflite")
    if device not in DEVICES:
        raise ExportError(f"aoti device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("aoti export for cuda needs a CUDA GPU, and torch sees none; use --device cpu")
    _check_size(model.cfg.image_size)
    wrapper = _wrapper(model).to(device)
    size = model.cfg.image_size
    example = torch.full((1, 3, size, size), 114.0, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        diffs = _build_and_check(model, wrapper, example, tmp, device)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = aoti_meta(model, classes, category_ids, source, device)
    write_meta(path, meta)
    log.info("wrote %s (%.1f KB, %s)", path, path.stat().st_size / 1024, device)
    return AotiExport(path, meta, diffs)


def _build_and_check(model: "RTMDet", wrapper, example, package_path: str, device: str) -> dict[str, float]:
    """torch.export the wrapper once, then compile the package and check it against torch
    (build_loadable: again with another C++ compiler where it crashes as it loads)."""
    program = _export(wrapper, example)
    return build_loadable(lambda cxx: _compile(program, package_path, cxx),
                          lambda: check_aoti(model, package_path, device, rtol=RTOL[device]), device)


def build_loadable(build: Callable[[str | None], None], check: Callable[[], T], device: str) -> T:
    """build(cxx) a package, then check() it in a process of its own; where torch's runtime crashes
    loading it (AotiCrash), build it again with the next C++ compiler found here (compilers()),
    warning which one crashed.

    Why: the package's wrapper is C++ that torch's runtime dlopens into its own process, so the
    compiler that built it matters. Seen on an H200 machine with torch 2.11: every package built
    with its CXX=/opt/gcc/bin/g++ (a script running another build of g++ 13.3 with its own -B and
    -isystem paths) crashed in std::regex as it loaded, CPU and CUDA alike; the same CUDA packages
    built with /usr/bin/g++ load and run (2026-12-02: the whole export ran there, falling back to
    it). Why that compiler's builds crash is not known: a C++ program built with it that runs a
    package built with /usr/bin/g++ crashes too (benchmarks/aoti_cpp_check.py)."""
    tried: list[str] = []
    for cxx in compilers() or [None]:
        if tried:
            log.warning("AOTInductor: the package built with %s crashed as it loaded; building it again with %s",
                        tried[-1], cxx)
        build(cxx)
        try:
            return check()
        except AotiCrash:
            tried.append(cxx or "Inductor's default compiler")
    raise ExportError(f"torch's AOTInductor runtime crashed loading the package for {device} built with each "
                      f"C++ compiler found here ({', '.join(tried)}); set CXX to another C++ compiler")


def aoti_meta(model: "RTMDet", classes: list[str] | None, category_ids: list[int] | None,
              source: dict | None, device: str) -> ExportMeta:
    """The sidecar of an AOTInductor package: the common fields, positional outputs, device and
    the post-process defaults."""
    from rtmdet.inference.postprocess import PostprocessConfig

    meta = base_meta(model, classes, category_ids, source, "aoti", "fp32")
    meta.outputs = all_output_names(model)
    meta.device = device
    meta.postprocess = asdict(PostprocessConfig())
    return meta


def compilers() -> list[str]:
    """The C++ compilers to build a package with, in the order tried: Inductor's own choice ($CXX,
    else g++), then the other distinct ones found here (g++, c++, clang++, /usr/bin/g++)."""
    found: dict[str, str] = {}
    wanted = os.environ.get("CXX") or "g++"
    if shutil.which(wanted) is None:
        log.warning("AOTInductor: the C++ compiler %s (CXX) is not found; trying the others here", wanted)
    for name in (wanted, "g++", "c++", "clang++", "/usr/bin/g++"):
        path = shutil.which(name)
        if path is not None:
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def _export(wrapper, example):
    """torch.export the wrapper at its one static shape."""
    import torch

    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (example,), strict=False)
    except Exception as exc:  # torch.export raises many unrelated types
        raise ExportError(f"AOTInductor could not compile the model: {first_line(exc)}") from None


def _compile(program, package_path: str, cxx: str | None = None) -> None:
    """AOTInductor-compile and package an exported program (with C++ compiler `cxx`; None:
    Inductor's choice)."""
    import torch
    from torch._inductor import aoti_compile_and_package

    configs = dict(INDUCTOR)
    if cxx is not None:
        configs["cpp.cxx"] = (cxx,)
    try:
        with torch.no_grad():
            aoti_compile_and_package(program, package_path=package_path, inductor_configs=configs)
    except Exception as exc:  # Inductor raises many unrelated types (and C++ compiler errors)
        raise ExportError(f"AOTInductor could not compile the model: {first_line(exc)}") from None


def check_aoti(model: "RTMDet", package_path: str | Path, device: str = "cpu", rtol: float = 2e-3) -> dict[str, float]:
    """Run the package on fixed canvases against torch, in a process of its own (aoti_probe); raise
    if an output differs by more than rtol of its largest magnitude (Inductor's fused kernels round
    float32 differently from eager, ~1e-6 of the range; a wrong graph is off by whole units)."""
    import numpy as np

    from rtmdet.export.aoti_probe import run_probe

    names = all_output_names(model)
    images = fixed_inputs(model.cfg.image_size, batch=2)
    ref = torch_reference(model, images)
    diffs: dict[str, float] = {name: 0.0 for name in names}
    for i, outs in enumerate(run_probe(package_path, device, images)):
        for name, out in zip(names, outs):
            diffs[name] = max(diffs[name], float(np.abs(out - ref[name][i : i + 1]).max()))
    for name, diff in diffs.items():
        limit = rtol * max(1.0, float(np.abs(ref[name]).max()))
        if diff > limit:
            raise ExportError(f"the AOTInductor package disagrees with torch on output {name}: "
                              f"max abs diff {diff:.3g} > {limit:.3g}")
    log.info("AOTInductor vs torch: max abs diff %.2g", max(diffs.values()))
    return diffs
