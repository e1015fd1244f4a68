"""Shared fixtures and markers: GPU tests skip without CUDA; references come from ../shared."""

from __future__ import annotations

from pathlib import Path

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
def _two_threads():
    # The references were computed with 2 intra-op threads; CPU conv results depend on it.
    torch.set_num_threads(2)


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
