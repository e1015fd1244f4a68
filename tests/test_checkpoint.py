"""Checkpoint loading: mmdetection layouts, other class counts, backbone-only, and bad files."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from rtmdet.errors import CheckpointError
from rtmdet.models import build_model
from rtmdet.models.checkpoint import checkpoint_dict, load_checkpoint, load_model, save_atomic


@pytest.fixture(scope="module")
def nano_sd(refs):
    sd = torch.load(refs / "parity_nano.pt", weights_only=True)["state_dict"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _same_weights(model, sd):
    own = model.state_dict()
    return all(torch.equal(own[k].float(), v.float()) for k, v in sd.items())


def test_mmdet_checkpoint_with_ema_and_mmengine_objects(tmp_path, nano_sd, monkeypatch):
    # An mmengine-style training checkpoint: EMA weights in state_dict, raw weights under
    # ema_state_dict with "module." keys, and a message_hub holding an mmengine class.
    mod = types.ModuleType("mmengine_fake_history")

    class HistoryBuffer:
        def __init__(self):
            self.data = [1.0, 2.0]

    HistoryBuffer.__module__ = mod.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    raw = {"module." + k: v * 0 for k, v in nano_sd.items()}
    ckpt = {"meta": {"epoch": 300, "dataset_meta": {"classes": ["a", "b", "c"]}}, "state_dict": nano_sd,
            "ema_state_dict": {**raw, "steps": torch.tensor(5)}, "message_hub": {"log": HistoryBuffer()}}
    path = tmp_path / "mmdet.pth"
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)  # publish_model's legacy format
    monkeypatch.delitem(sys.modules, mod.__name__)  # as on a machine without mmengine

    model, loaded = load_model(path)
    assert model.cfg.size == "nano" and model.cfg.num_classes == 3
    assert _same_weights(model, nano_sd)


def test_ddp_prefix_and_plain_state_dict(tmp_path, nano_sd):
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in nano_sd.items()}}, path)
    model = build_model("nano", 3)
    load_checkpoint(model, path)
    assert _same_weights(model, nano_sd)
    torch.save(nano_sd, tmp_path / "bare.pt")
    model2, _ = load_model(tmp_path / "bare.pt")
    assert _same_weights(model2, nano_sd)


def test_other_class_count_reinitializes_only_class_predictors(tmp_path, nano_sd, caplog):
    path = tmp_path / "c3.pt"
    torch.save({"state_dict": nano_sd}, path)
    model = build_model("nano", 7)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(model, path)
    assert "3 classes, model has 7" in caplog.text and "bbox_head.rtm_cls.0.weight" in caplog.text
    own = model.state_dict()
    assert torch.equal(own["bbox_head.rtm_reg.0.weight"], nano_sd["bbox_head.rtm_reg.0.weight"])
    assert own["bbox_head.rtm_cls.0.weight"].shape == (7, 64, 1, 1)
    assert torch.allclose(own["bbox_head.rtm_cls.0.bias"], torch.full((7,), -4.595), atol=1e-3)


@pytest.mark.parametrize("prefix", ["backbone.", ""])
def test_backbone_only_checkpoint(tmp_path, nano_sd, prefix):
    bb = {prefix + k[len("backbone."):]: v for k, v in nano_sd.items() if k.startswith("backbone.")}
    bb["head.fc.weight"] = torch.zeros(1000, 256)  # an ImageNet classifier's head is ignored
    path = tmp_path / "cspnext.pth"
    torch.save({"state_dict": bb, "meta": {}}, path)
    model = build_model("nano", 3)
    head_before = model.bbox_head.rtm_reg[0].weight.clone()
    load_checkpoint(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in nano_sd.items() if k.startswith("backbone."))
    assert torch.equal(model.bbox_head.rtm_reg[0].weight, head_before)


def test_own_checkpoint_round_trip_records_the_knobs(tmp_path):
    model = build_model("tiny", 2, act="relu6", channel_attention=False, normalization="unit", image_size=320)
    path = tmp_path / "own.pt"
    save_atomic(checkpoint_dict(model, ["cat", "dog"], [3, 9]), path)
    loaded, ckpt = load_model(path)
    assert loaded.cfg == model.cfg
    assert ckpt["meta"]["dataset_meta"] == {"classes": ["cat", "dog"], "category_ids": [3, 9]}
    assert _same_weights(loaded, model.state_dict())


def test_bad_files_give_one_clear_line(tmp_path, nano_sd):
    model = build_model("nano", 3)
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint file not found"):
        load_checkpoint(model, tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    torch.save({"state_dict": nano_sd}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable checkpoint"):
        load_checkpoint(model, truncated)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable checkpoint"):
        load_model(text)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match=r"list\.pt: not a checkpoint \(holds a list"):
        load_model(listing)


def test_other_architecture_counts_missing_and_unexpected(tmp_path):
    other = {"backbone.conv1.weight": torch.zeros(8, 3, 3, 3), "neck.lateral.weight": torch.zeros(4, 4),
             "bbox_head.cls.weight": torch.zeros(80, 4)}
    path = tmp_path / "yolox.pth"
    torch.save({"state_dict": other}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_model("nano", 3), path)
    msg = str(err.value)
    assert "yolox.pth" in msg and "missing keys" in msg and "3 unexpected keys" in msg
    assert "neck.lateral.weight" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match=r"yolox\.pth: not an RTMDet detector checkpoint"):
        load_model(path)


def test_save_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "ck.pt"

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic({"x": Unpicklable()}, target)
    assert list(tmp_path.iterdir()) == []
