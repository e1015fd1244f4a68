"""benchmarks/peer_yolo.py's light parent-side logic: pair parsing, ratios and the table (no training)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("peer_yolo", Path(__file__).parents[1] / "benchmarks" / "peer_yolo.py")
peer = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(peer)


def test_pairs_accept_an_activation_variant_and_reject_unknown_ones():
    assert peer._pair("tiny:320") == ("tiny", 320)
    assert peer._pair("nano-silu:192") == ("nano-silu", 192)
    assert peer.split_variant("nano-silu") == ("nano", {"act": "silu"})
    assert peer.split_variant("tiny") == ("tiny", {})
    for bad in ("nano-gelu:192", "nano", "nano:abc", ":192"):
        with pytest.raises(argparse.ArgumentTypeError, match="SIZE"):
            peer._pair(bad)


def _run(kind, name, imgsz, mAP, wall):
    return {"kind": kind, "name": name, "model": name, "imgsz": imgsz, "mAP": mAP, "mAP50": 2 * mAP,
            "mAP_small": mAP / 2, "wall_s": wall, "images_per_s": 100.0, "peak_mem_gib": 1.0, "params": 2_000_000}


def test_every_rtmdet_variant_is_compared_with_the_yolo_run_of_its_image_size():
    runs = [_run("rtmdet", "rtmdet_tiny_320", 320, 0.40, 300), _run("yolo", "yolo11n_320", 320, 0.32, 350),
            _run("rtmdet", "rtmdet_nano_192", 192, 0.20, 250), _run("rtmdet", "rtmdet_nano_silu_192", 192, 0.24, 250),
            _run("yolo", "yolo11n_192", 192, 0.20, 400),
            {"kind": "rtmdet", "name": "rtmdet_s_640", "imgsz": 640, "error": "exit 1"}]
    pairs = {(p["rtmdet"], p["yolo"]): p for p in peer.pair_ratios(runs)}
    assert set(pairs) == {("rtmdet_tiny_320", "yolo11n_320"), ("rtmdet_nano_192", "yolo11n_192"),
                          ("rtmdet_nano_silu_192", "yolo11n_192")}
    assert pairs["rtmdet_nano_silu_192", "yolo11n_192"]["mAP_ratio"] == pytest.approx(1.2)
    assert pairs["rtmdet_tiny_320", "yolo11n_320"]["time_ratio"] == pytest.approx(300 / 350)
    table = peer.format_table({"settings": {"epochs": 100, "batch": 32, "seed": 0, "workers": 16},
                               "runs": runs, "pairs": peer.pair_ratios(runs)})
    assert "| rtmdet_nano_silu_192 | 192 | 0.2400 | 0.4800 |" in table
    assert "rtmdet_s_640 | 640 | failed: exit 1" in table
    assert "rtmdet_nano_silu_192 / yolo11n_192: mAP 1.200x" in table
