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
