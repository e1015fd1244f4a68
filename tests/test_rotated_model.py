"""RTMDet-R's model (task rotate): MMRotate's state-dict layout and counts, parity with its head
outputs and rotated-box decoding, and the le90 angle convention."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rtmdet.errors import ConfigError
from rtmdet.inference.rotated import decode_rotated, norm_angle_le90
from rtmdet.models import build_model
from rtmdet.training.losses import make_priors

from conftest import max_rel_diff, merged_parity_state_dict, rel_diff


@pytest.mark.parametrize("size", ["tiny", "s", "m", "l"])
def test_state_dict_matches_mmrotate_manifest(refs, size):
    manifest = json.loads((refs / f"manifest_rot_{size}.json").read_text())
    model = build_model(size, 15, task="rotate")
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == \
        [[k, shape] for k, shape, _ in manifest["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]["total"]
    assert sum(p.numel() for p in model.bbox_head.parameters()) == manifest["params"]["bbox_head"]
    assert model.bbox_head.exp_on_reg == manifest["module_facts"]["head"]["exp_on_reg"]


# Per tensor, max|ours - ref| / max|ref|: the refs README measured the same backbone and neck within
# 1.4e-5 between CPUs; a swapped branch (angle on the class features) or a wrong sign moves 1e-1.
PARITY_TOL = 1e-4


def test_parity_with_mmrotate(refs):
    sd, ref = merged_parity_state_dict(refs, "rot_tiny")
    model = build_model("tiny", 15, task="rotate").eval()
    model.load_state_dict(sd, strict=True)
    x = ref["input"].float()
    with torch.no_grad():
        neck = model.neck(model.backbone(x))
        cls_scores, bbox_preds, angle_preds = model.bbox_head(neck)
        model.bbox_head.exp_on_reg = True
        _, bbox_exp, _ = model.bbox_head(neck)
    assert max_rel_diff(neck, ref["neck_outs"]) < PARITY_TOL
    assert max_rel_diff(cls_scores, ref["cls_scores"]) < PARITY_TOL
    assert max_rel_diff(bbox_preds, ref["bbox_preds"]) < PARITY_TOL
    assert max_rel_diff(angle_preds, ref["angle_preds"]) < PARITY_TOL
    assert max_rel_diff(bbox_exp, ref["bbox_preds_exp_on_reg"]) < PARITY_TOL
    # Decoding mmrotate's own head outputs: the formula alone, compared at 1e-6.
    priors = make_priors([tuple(c.shape[-2:]) for c in ref["cls_scores"]])
    flat = [torch.cat([t[0].flatten(1).T for t in ref[k]]) for k in ("bbox_preds", "angle_preds")]
    decoded = decode_rotated(priors[:, :2], *flat)
    assert decoded.shape == ref["decoded_rboxes"].shape == (2100, 5)
    assert rel_diff(decoded, ref["decoded_rboxes"]) < 1e-6


def test_le90_angles_and_a_hand_decoded_box():
    angles = torch.tensor([0.0, math.pi / 2, -math.pi / 2, math.pi, 3 * math.pi / 4, -3 * math.pi / 4])
    normed = norm_angle_le90(angles)
    assert torch.all(normed >= -math.pi / 2) and torch.all(normed < math.pi / 2)
    assert torch.allclose(normed, torch.tensor([0.0, -math.pi / 2, -math.pi / 2, 0.0, -math.pi / 4, math.pi / 4]),
                          atol=1e-6)
    # A point at (100, 50), 10 px left, 30 right, 5 up, 15 down, turned by 90 degrees: the box's
    # own frame's x axis points along +y, so its centre moves 10 px down and 5 px left.
    box = decode_rotated(torch.tensor([[100.0, 50.0]]), torch.tensor([[10.0, 5.0, 30.0, 15.0]]),
                         torch.tensor([[math.pi / 2 - 1e-6]]))
    assert torch.allclose(box[0, :4], torch.tensor([95.0, 60.0, 40.0, 20.0]), atol=1e-4)


def test_task_is_a_model_knob_kept_in_the_config():
    model = build_model("nano", 3, task="rotate")
    assert model.cfg.task == "rotate" and model.cfg.to_dict()["task"] == "rotate"
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o[0].shape[1] for o in outs] == [3, 4, 1]
    assert build_model("nano", 3).cfg.task == "detect"
    with pytest.raises(ConfigError, match="unknown task 'pose'; valid tasks: detect, segment, rotate"):
        build_model("nano", 3, task="pose")


@pytest.mark.parametrize("task", ["rotate", "segment"])
def test_task_checkpoints_are_recognized_and_refused_where_unsupported(tmp_path, task):
    from rtmdet.errors import CheckpointError
    from rtmdet.models.checkpoint import infer_config, load_model

    model = build_model("tiny", 5, task=task)
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": model.state_dict()}, path)  # an OpenMMLab checkpoint: weights, no rtmdet meta
    cfg = infer_config(model.state_dict())
    assert (cfg.size, cfg.num_classes, cfg.task) == ("tiny", 5, task)
    with pytest.raises(CheckpointError, match=f"an RTMDet {task} model; this step handles box detection only"):
        load_model(path)  # export, QAT: boxes only so far
    if task == "segment":  # prediction and evaluation take RTMDet-Ins checkpoints
        loaded, _ = load_model(path, tasks=("detect", "segment"))
        assert loaded.cfg.task == "segment"
    else:
        with pytest.raises(CheckpointError, match="this step handles detect and segment only"):
            load_model(path, tasks=("detect", "segment"))
