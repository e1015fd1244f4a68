"""Model core: mmdetection's state-dict layout, parameter counts and parity with its outputs."""

from __future__ import annotations

import json

import pytest
import torch

from rtmdet.errors import ConfigError
from rtmdet.models import SIZES, build_model

from conftest import max_rel_diff


@pytest.mark.parametrize("size", ["tiny", "s", "m", "l", "x"])
def test_state_dict_matches_manifest(refs, size):
    manifest = json.loads((refs / f"manifest_{size}.json").read_text())
    model = build_model(size, 80)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    theirs = [[k, shape] for k, shape, _ in manifest["state_dict"]]
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]["total"]
    for part in ("backbone", "neck", "bbox_head"):
        n = sum(p.numel() for p in getattr(model, part).parameters())
        assert n == manifest["params"][part], part


def test_nano_parameter_count():
    # refs README: the nano model of parity_nano.pt has 2,141,821 parameters with 3 classes.
    model = build_model("nano", 3)
    assert sum(p.numel() for p in model.parameters()) == 2_141_821
    assert not any("attention" in k for k in model.state_dict())
    assert isinstance(model.backbone.stem[0].activate, torch.nn.ReLU6)


def test_shared_head_convs_are_one_module():
    head = build_model("tiny", 80).bbox_head
    assert head.cls_convs[2][1].conv is head.cls_convs[0][1].conv
    assert head.reg_convs[1][0].conv is head.reg_convs[0][0].conv
    assert head.cls_convs[1][0].bn is not head.cls_convs[0][0].bn


# Per tensor, max|ours - ref| / max|ref|. The refs README measured up to 1.4e-5 between two CPUs
# (AVX2 vs AVX-512) and 1.7e-5 between 1 and 2 threads, and says to compare within about 1e-4;
# a real error (a wrong BN epsilon, a swapped channel) moves these by 1e-3 or far more.
PARITY_TOL = 1e-4


@pytest.mark.parametrize("name,size,num_classes", [("tiny", "tiny", 80), ("nano", "nano", 3)])
def test_parity_with_mmdetection(refs, name, size, num_classes):
    ref = torch.load(refs / f"parity_{name}.pt", weights_only=True)
    model = build_model(size, num_classes).eval()
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ref["state_dict"].items()}
    model.load_state_dict(sd, strict=True)
    x = ref["input"].float()
    with torch.no_grad():
        feats = model.backbone(x)
        neck = model.neck(feats)
        cls_scores, bbox_preds = model.bbox_head(neck)
        model.bbox_head.exp_on_reg = True
        _, bbox_exp = model.bbox_head(neck)
    assert [f.shape for f in feats] == [r.shape for r in ref["backbone_outs"]]
    assert max_rel_diff(feats, ref["backbone_outs"]) < PARITY_TOL
    assert max_rel_diff(neck, ref["neck_outs"]) < PARITY_TOL
    assert max_rel_diff(cls_scores, ref["cls_scores"]) < PARITY_TOL
    assert max_rel_diff(bbox_preds, ref["bbox_preds"]) < PARITY_TOL
    assert max_rel_diff(bbox_exp, ref["bbox_preds_exp_on_reg"]) < PARITY_TOL


def test_forward_shapes_and_units():
    model = build_model("nano", 5).eval()
    with torch.no_grad():
        cls_scores, bbox_preds = model(torch.zeros(2, 3, 128, 96))
    assert [tuple(c.shape) for c in cls_scores] == [(2, 5, 16, 12), (2, 5, 8, 6), (2, 5, 4, 3)]
    assert [tuple(b.shape) for b in bbox_preds] == [(2, 4, 16, 12), (2, 4, 8, 6), (2, 4, 4, 3)]


def test_knobs_change_the_model():
    model = build_model("tiny", 3, act="relu", channel_attention=False, normalization="unit")
    assert model.cfg.act == "relu" and not model.cfg.channel_attention
    assert isinstance(model.neck.out_convs[0].activate, torch.nn.ReLU)
    assert torch.equal(model.std.flatten(), torch.tensor([255.0, 255.0, 255.0]))
    assert SIZES["m"].exp_on_reg and not SIZES["tiny"].exp_on_reg


def test_bad_size_and_activation_list_valid_values():
    with pytest.raises(ConfigError, match=r"unknown model size 'huge'; valid sizes: nano, tiny, s, m, l, x"):
        build_model("huge")
    with pytest.raises(ConfigError, match=r"unknown activation 'gelu'; valid activations: relu, relu6, silu"):
        build_model("tiny", act="gelu")


@pytest.mark.parametrize("kernels,chained", [((5, 9, 13), True), ((3, 5, 7), True), ((3, 5, 9), False)])
def test_spp_pools_chained_as_sppf_give_the_same_numbers(kernels, chained):
    from rtmdet.models.layers import SPPBottleneck

    torch.manual_seed(0)
    spp = SPPBottleneck(16, 16, "silu", kernel_sizes=kernels).eval()
    assert spp.chain == chained
    for hw in ((20, 20), (3, 7), (1, 1)):  # maps smaller than the widest window too
        x = torch.randn(2, 16, *hw) * 3
        with torch.no_grad():
            y = spp.conv1(x)
            direct = spp.conv2(torch.cat([y] + [pool(y) for pool in spp.poolings], dim=1))
            assert torch.equal(spp(x), direct)
