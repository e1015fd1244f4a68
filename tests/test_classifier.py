"""CSPNeXt classifiers: mmpretrain's state-dict layout, published parameter counts, parity with
mmpretrain's outputs, its RGB preprocessing, and a classifier's backbone starting a detector."""

from __future__ import annotations

import json

import pytest
import torch

from rtmdet.errors import ConfigError
from rtmdet.models import build_model
from rtmdet.models.checkpoint import load_checkpoint
from rtmdet.models.classifier import RGB_MEAN, RGB_STD, build_classifier

from conftest import merged_parity_state_dict, rel_diff

SIZES = ["tiny", "s", "m", "l", "x"]


@pytest.mark.parametrize("size", SIZES)
def test_state_dict_matches_mmpretrain_manifest(refs, size):
    manifest = json.loads((refs / f"manifest_cls_{size}.json").read_text())
    model = build_classifier(size, 1000)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == [[k, shape] for k, shape, _ in manifest["state_dict"]]  # keys, shapes and order
    total = sum(p.numel() for p in model.parameters())
    assert total == manifest["params"]["total"]
    assert round(total / 1e6, 2) == manifest["params_published_M"]
    assert sum(p.numel() for p in model.head.parameters()) == manifest["params"]["head"]


def test_classifier_backbone_is_the_detectors():
    # The same module and keys: a classifier trained here (or mmpretrain's) starts a detector.
    cls_keys = [k for k in build_classifier("s", 5).state_dict() if k.startswith("backbone.")]
    det_keys = [k for k in build_model("s", 3).state_dict() if k.startswith("backbone.")]
    assert cls_keys == det_keys


# Per tensor, max|ours - ref| / max|ref|: the refs README measured up to 1.4e-5 between CPUs for
# the same backbone; a wrong pooling, channel order or head shows at 1e-2 or more.
PARITY_TOL = 1e-4


def _parity_model(refs) -> tuple[torch.nn.Module, dict]:
    sd, ref = merged_parity_state_dict(refs, "cls_tiny")
    model = build_classifier("tiny", 1000).eval()
    model.load_state_dict(sd, strict=True)
    return model, ref


def test_parity_with_mmpretrain(refs):
    model, ref = _parity_model(refs)
    x = ref["input"].float()
    with torch.no_grad():
        last = model.backbone(x)[-1]
        pooled = model.features(x)
        logits = model(x)
    assert rel_diff(last, ref["backbone_outs"][0]) < PARITY_TOL
    assert rel_diff(pooled, ref["neck_out"]) < PARITY_TOL
    assert rel_diff(logits, ref["logits"]) < PARITY_TOL
    assert rel_diff(logits.softmax(-1), ref["pred_score"].reshape(1, -1)) < PARITY_TOL
    assert int(logits.argmax()) == int(ref["pred_label"].reshape(-1)[0])


def test_normalize_turns_bgr_into_mmpretrains_rgb_input():
    model = build_classifier("tiny", 10)
    bgr = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    bgr[0, 0] = 255  # pure blue, as cv2 decodes it
    x = model.normalize(bgr)
    expected = [(0 - RGB_MEAN[0]) / RGB_STD[0], (0 - RGB_MEAN[1]) / RGB_STD[1], (255 - RGB_MEAN[2]) / RGB_STD[2]]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))


def test_a_classifier_checkpoint_starts_a_detector_backbone(tmp_path):
    torch.manual_seed(0)
    classifier = build_classifier("tiny", 7)
    path = tmp_path / "cls.pth"
    torch.save({"state_dict": classifier.state_dict(), "meta": {}}, path)  # mmpretrain's layout
    detector = build_model("tiny", 3)
    load_checkpoint(detector, path)
    ours, theirs = detector.backbone.state_dict(), classifier.backbone.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sizes_knobs_and_bad_values():
    nano = build_classifier("nano", 3)
    assert isinstance(nano.backbone.stem[0].activate, torch.nn.ReLU6) and nano.head.fc.out_features == 3
    assert build_classifier("tiny", 4, act="relu", image_size=160).cfg.image_size == 160
    assert nano(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ConfigError, match="unknown model size 'huge'"):
        build_classifier("huge")
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_classifier("tiny", 1)
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_classifier("tiny", 5, image_size=100)
