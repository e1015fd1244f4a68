"""The prepare stage's logic: a normalized copy that reloads identically, statistics, advice."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from rtmdet.data.coco import load_dataset
from rtmdet.data.prepare import load_prepared, plot_stats, prepare
from rtmdet.errors import DataError


def test_prepared_copy_reloads_to_the_same_records(facemask, tmp_path):
    dataset = load_dataset(facemask)
    stats = prepare(dataset, tmp_path / "prepared", imgsz=192)
    again = load_prepared(tmp_path / "prepared")
    assert again.classes == dataset.classes and again.category_ids == dataset.category_ids
    for name in ("train", "valid"):
        a, b = dataset.splits[name].records, again.splits[name].records
        assert [r.image_id for r in a] == [r.image_id for r in b]
        assert [r.file for r in a] == [r.file for r in b]
        assert all(np.allclose(x.boxes, y.boxes, atol=1e-4) and np.array_equal(x.labels, y.labels) for x, y in zip(a, b))
    assert stats["splits"]["train"]["images"] == 677 and stats["splits"]["valid"]["boxes"] == 915
    sizes = stats["splits"]["valid"]["box_sizes_at_imgsz"]
    assert sizes["small"] + sizes["medium"] + sizes["large"] == 915
    on_disk = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    assert on_disk["splits"]["train"]["warnings"] == {}
    pngs = plot_stats(stats, tmp_path / "plots")
    assert all(p.stat().st_size > 10_000 for p in pngs)


def test_class_count_mismatch_and_tiny_box_advice(facemask, tmp_path, caplog):
    dataset = load_dataset(facemask)
    with pytest.raises(DataError, match=r"data.num_classes is 5 but the dataset has 3 classes"):
        prepare(dataset, tmp_path / "p1", imgsz=192, num_classes=5)
    with caplog.at_level(logging.WARNING):
        stats = prepare(dataset, tmp_path / "p2", imgsz=64)
    assert "consider a larger model.imgsz" in caplog.text and stats["advice"]


def test_missing_prepared_folder_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match=r"dataset.json: prepared dataset not found; run the prepare stage"):
        load_prepared(tmp_path)
