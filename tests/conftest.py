"""Shared fixtures and markers: GPU tests skip without CUDA; references come from ../shared."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFS = SHARED / "refs"
FACEMASK = SHARED / "datasets" / "facemask"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # 2 intra-op threads (CI's cores) unless OMP_NUM_THREADS says otherwise: the suite must pass
    # at any count, so no comparison below relies on one thread count's rounding.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


def rel_diff(ours, ref) -> float:
    """max |ours - ref| / max |ref| over one tensor (CONVENTIONS.md, "Numbers against references").

    Element-wise relative errors blow up near zero; this one measures a difference against the
    tensor's own scale, which is what another CPU's rounding moves."""
    a = np.asarray(ours.detach().cpu().double() if isinstance(ours, torch.Tensor) else ours, np.float64)
    b = np.asarray(ref.detach().cpu().double() if isinstance(ref, torch.Tensor) else ref, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.abs(b).max() if b.size else 0.0
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max(initial=0.0))


def max_rel_diff(ours: Sequence, ref: Sequence) -> float:
    """The largest per-tensor rel_diff over paired lists of tensors (one per level)."""
    assert len(ours) == len(ref)
    return max(rel_diff(a, b) for a, b in zip(ours, ref))


@pytest.fixture(scope="session")
def refs() -> Path:
    if not REFS.is_dir():
        pytest.skip(f"reference files not found at {REFS}")
    return REFS


@pytest.fixture(scope="session")
def facemask() -> Path:
    if not FACEMASK.is_dir():
        pytest.skip(f"facemask dataset not found at {FACEMASK}")
    return FACEMASK


@pytest.fixture
def strict_fp32():
    """Convolutions and matmuls in true fp32 for the test, TF32 off (cuDNN's default is on, and a
    CUDA training earlier in the session turns matmuls on too): the references were made on the
    CPU, and TF32's 10-bit mantissa moved one score across the threshold (120 detections, not 119)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def random_detector_checkpoint(path: Path, size: str = "nano", classes=("cat", "dog"), image_size: int = 64,
                               category_ids=None) -> Path:
    """Save an untrained model whose boxes are real (distances of about one stride), not zero-sized."""
    from rtmdet.models import build_model
    from rtmdet.models.checkpoint import checkpoint_dict, save_atomic

    torch.manual_seed(0)
    model = build_model(size, len(classes), image_size=image_size)
    with torch.no_grad():
        for conv in model.bbox_head.rtm_reg:
            conv.bias.uniform_(0.5, 2.0)
    save_atomic(checkpoint_dict(model, list(classes), category_ids), path)
    return path


def fit_classifier(images: Sequence, num_classes: int, size: int, steps: int):
    """A nano classifier fitted for `steps` full-batch AdamW steps on class-folder images (ClassImage),
    its BN statistics then set from those images: its predictions differ between images (an
    untrained net says one class for all). Returned in eval mode."""
    from rtmdet.export.classify import load_images
    from rtmdet.models import build_classifier

    torch.manual_seed(0)
    net = build_classifier("nano", num_classes, image_size=size)
    x = net.normalize(torch.from_numpy(load_images([im.file for im in images], size)).permute(0, 3, 1, 2))
    y = torch.tensor([im.label for im in images])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: one pass gives the images' statistics
    with torch.no_grad():
        net(x)
    return net.eval()


def _gloo_rank(target, rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from rtmdet.training.distributed import DistInfo

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out.put((rank, target(DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu")))))
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(target, world: int = 2, timeout: float = 120.0) -> list:
    """Run target(info) in `world` spawned CPU processes joined in one gloo group over localhost;
    returns each rank's return value, by rank. target must be a module-level function."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(target, r, world, port, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=timeout) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    return [results[r] for r in range(world)]


def merged_parity_state_dict(refs: Path, name: str) -> tuple[dict, dict]:
    """(float state dict, the file) of a second-batch parity file (parity_<name>.pt): its head merged
    with the backbone (and neck) of the file it names, as the refs README shows."""
    ref = torch.load(refs / f"parity_{name}.pt", weights_only=True)
    base = torch.load(refs / ref["base_state_dict_file"], weights_only=True)["state_dict"]
    prefixes = tuple(ref["base_state_dict_prefixes"])
    sd = {k: (base[k] if k.startswith(prefixes) else ref["state_dict"][k]) for k in ref["state_dict_key_order"]}
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, ref
