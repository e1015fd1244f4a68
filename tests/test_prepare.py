"""The prepare stage's logic: a normalized copy that reloads identically, statistics, advice."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from rtmdet.data.coco import load_dataset
from rtmdet.data.prepare import load_prepared, plot_stats, prepare, stored_img_dir
from rtmdet.data.synthetic import make_synthetic_dataset
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


def _same_records(a, b) -> bool:
    return [(r.image_id, r.file) for r in a.records] == [(r.image_id, r.file) for r in b.records]


def test_a_linked_dataset_gives_the_same_paths_everywhere(tmp_path, monkeypatch):
    # Users symlink data folders: through the link, the real folder, or the prepared copy, every
    # record names the same (resolved) file, so comparisons and duplicate checks agree.
    real = make_synthetic_dataset(tmp_path / "real" / "shapes", seed=1, train=6, valid=3)
    (tmp_path / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    via_link = load_dataset(tmp_path / "linked" / "shapes")
    direct = load_dataset(real)
    prepare(via_link, tmp_path / "prepared", imgsz=64)
    again = load_prepared(tmp_path / "prepared")
    for name in ("train", "valid"):
        assert _same_records(via_link.splits[name], direct.splits[name])
        assert _same_records(via_link.splits[name], again.splits[name])
        assert via_link.splits[name].img_dir == real.resolve() / name
    index = json.loads((tmp_path / "prepared" / "dataset.json").read_text())
    assert index["splits"]["train"]["img_dir"] == "../real/shapes/train"  # inside the project: relative


def test_stored_image_folder_is_relative_inside_the_project_and_absolute_outside(tmp_path, monkeypatch):
    project, outside = tmp_path / "project", tmp_path / "elsewhere" / "train"
    (project / "data" / "synthetic" / "train").mkdir(parents=True)
    outside.mkdir(parents=True)
    monkeypatch.chdir(project)
    prepared = project / "data" / "prepared"
    assert stored_img_dir(project / "data" / "synthetic" / "train", prepared) == "../synthetic/train"
    # An experiment runs in a temporary copy of the project: a relative path out of it would break.
    assert stored_img_dir(outside, prepared) == str(outside.resolve())


def test_prepared_masks_reload_for_the_segment_task_and_only_when_prepared(tmp_path):
    root = make_synthetic_dataset(tmp_path / "shapes", seed=2, train=6, valid=3)
    dataset = load_dataset(root, masks=True)
    prepare(dataset, tmp_path / "seg", imgsz=64, masks=True)
    again = load_prepared(tmp_path / "seg", masks=True)
    for a, b in zip(dataset.splits["train"].records, again.splits["train"].records):
        assert a.segmentations == b.segmentations and np.array_equal(a.boxes, b.boxes)
    assert any(r.segmentations for r in again.splits["train"].records)
    prepare(load_dataset(root), tmp_path / "boxes", imgsz=64)
    assert "masks" not in json.loads((tmp_path / "boxes" / "dataset.json").read_text())  # boxes-only: as before
    with pytest.raises(DataError, match="prepared without instance masks.*dvc repro prepare"):
        load_prepared(tmp_path / "boxes", masks=True)
