"""RTMDet-Ins's model (task segment): mmdetection's state-dict layout and counts, and parity with
its head outputs, mask features and dynamic convolution."""

from __future__ import annotations

import json

import pytest
import torch

from rtmdet.models import build_model
from rtmdet.models.head_ins import NUM_GEN_PARAMS, dynamic_mask_logits
from rtmdet.training.losses import make_priors

from conftest import max_rel_diff, rel_diff


@pytest.mark.parametrize("size", ["tiny", "s", "m", "l", "x"])
def test_state_dict_matches_mmdetection_manifest(refs, size):
    manifest = json.loads((refs / f"manifest_ins_{size}.json").read_text())
    model = build_model(size, 80, task="segment")
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == \
        [[k, shape] for k, shape, _ in manifest["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]["total"]
    assert sum(p.numel() for p in model.bbox_head.parameters()) == manifest["params"]["bbox_head"]


def test_regression_branch_is_the_class_branch_and_kernel_convs_are_per_level():
    head = build_model("tiny", 3, task="segment").bbox_head
    assert head.reg_convs[1] is head.cls_convs[1] and head.cls_convs[2][0].conv is head.cls_convs[0][0].conv
    assert head.kernel_convs[1][0].conv is not head.kernel_convs[0][0].conv
    assert head.rtm_kernel[0].out_channels == NUM_GEN_PARAMS == 169


# Per tensor, max|ours - ref| / max|ref|: the refs README measured the shared backbone and neck
# within 1.4e-5 between CPUs and the dynamic logits within 7.3e-3 / 1392 between thread counts;
# a swapped coordinate or a wrong normaliser moves these by 1e-2 or more.
PARITY_TOL = 1e-4


def _parity(refs):
    ref = torch.load(refs / "parity_ins_tiny.pt", weights_only=True)
    base = torch.load(refs / ref["base_state_dict_file"], weights_only=True)["state_dict"]
    prefixes = tuple(ref["base_state_dict_prefixes"])
    sd = {k: (base[k] if k.startswith(prefixes) else ref["state_dict"][k]) for k in ref["state_dict_key_order"]}
    model = build_model("tiny", 80, task="segment").eval()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    return model, ref


def test_parity_with_mmdetection(refs):
    model, ref = _parity(refs)
    with torch.no_grad():
        cls_scores, bbox_preds, kernel_preds, mask_feat = model(ref["input"].float())
    assert max_rel_diff(cls_scores, ref["cls_scores"]) < PARITY_TOL
    assert max_rel_diff(bbox_preds, ref["bbox_preds"]) < PARITY_TOL
    assert max_rel_diff(kernel_preds, ref["kernel_preds"]) < PARITY_TOL
    assert rel_diff(mask_feat, ref["mask_feat"]) < PARITY_TOL


def test_dynamic_conv_matches_mmdetection(refs):
    ref = torch.load(refs / "parity_ins_tiny.pt", weights_only=True)
    priors = make_priors([tuple(c.shape[-2:]) for c in ref["cls_scores"]])
    idx = torch.tensor(ref["meta"]["dyn_prior_idx"])
    assert torch.equal(priors[idx], ref["dyn_priors"].float())
    kernels = torch.cat([k[0].flatten(1).T for k in ref["kernel_preds"]])[idx]
    logits = dynamic_mask_logits(ref["mask_feat"][0].float(), kernels, priors[idx])
    assert rel_diff(logits, ref["dyn_mask_logits"]) < PARITY_TOL
    assert ((logits > 0) != (ref["dyn_mask_logits"] > 0)).sum() <= 2  # signs: the masks themselves
    assert dynamic_mask_logits(ref["mask_feat"][0], kernels[:0], priors[:0]).shape == (0, 40, 40)
