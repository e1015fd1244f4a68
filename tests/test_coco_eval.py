"""rtmdet.evaluation: exact agreement with pycocotools, and the edge cases users hit."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rtmdet.data.records import DetectionDataset, DetectionSplit, ImageRecord
from rtmdet.errors import DataError
from rtmdet.evaluation import (
    STAT_NAMES,
    CocoScorer,
    coco_gt_from_split,
    detections_to_coco_results,
    evaluate_detector,
    evaluate_results,
    format_coco_table,
)
from rtmdet.inference.detections import Detections

FACEMASK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "facemask"


# ---------------------------------------------------------------- helpers


def _load_raw(ann_file: Path, img_dir: Path) -> tuple[DetectionSplit, DetectionDataset]:
    """A tiny stand-in for the dataset reader: classes are the categories that have boxes."""
    raw = json.loads(ann_file.read_text())
    used = {a["category_id"] for a in raw["annotations"]}
    cats = sorted((c for c in raw["categories"] if c["id"] in used), key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in raw["images"]}
    for a in raw["annotations"]:
        by_image[a["image_id"]].append(a)
    records = []
    for img in raw["images"]:
        anns = [a for a in by_image[img["id"]] if not a.get("iscrowd", 0)]
        crowd = [a for a in by_image[img["id"]] if a.get("iscrowd", 0)]
        records.append(ImageRecord(
            image_id=img["id"], file=img_dir / img["file_name"],
            width=img["width"], height=img["height"],
            boxes=_xyxy([a["bbox"] for a in anns]),
            labels=np.array([label_of[a["category_id"]] for a in anns], np.int64),
            areas=np.array([a["area"] for a in anns], np.float32),
            crowd_boxes=_xyxy([a["bbox"] for a in crowd]),
        ))  # fmt: skip
    split = DetectionSplit(name=img_dir.name, ann_file=ann_file, img_dir=img_dir, records=records)
    dataset = DetectionDataset(
        classes=[c["name"] for c in cats], category_ids=[c["id"] for c in cats],
        splits={split.name: split},
    )  # fmt: skip
    return split, dataset


def _xyxy(xywh: list) -> np.ndarray:
    b = np.array(xywh, np.float32).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def _fake_predictions(split: DetectionSplit, num_classes: int, seed: int = 0) -> dict:
    """GT boxes jittered, some dropped, some classes swapped, plus random false positives."""
    rng = np.random.default_rng(seed)
    out = {}
    for rec in split.records:
        keep = rng.random(len(rec.boxes)) > 0.15
        boxes, labels = rec.boxes[keep].astype(np.float64), rec.labels[keep].copy()
        wh = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        boxes = boxes + rng.normal(0, 0.08, boxes.shape) * wh
        swap = rng.random(len(labels)) < 0.1
        labels[swap] = rng.integers(0, num_classes, swap.sum())
        n_fp = rng.integers(0, 4)
        xy = rng.random((n_fp, 2)) * [rec.width, rec.height]
        fp = np.concatenate([xy, xy + rng.uniform(4, 60, (n_fp, 2))], axis=1)
        boxes = np.concatenate([boxes, fp])
        labels = np.concatenate([labels, rng.integers(0, num_classes, n_fp)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, keep.sum()), rng.uniform(0.0, 0.6, n_fp)])
        order = np.argsort(-scores)
        out[rec.image_id] = Detections(
            boxes=boxes[order].astype(np.float32), scores=scores[order].astype(np.float32),
            labels=labels[order].astype(np.int64), class_names=[], image_hw=(rec.height, rec.width),
        )  # fmt: skip
    return out


def _pycocotools_direct(ann_file: Path, results_file: Path) -> tuple[np.ndarray, COCOeval]:
    """pycocotools as a user would run it on their own file and a results JSON."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats, ev


def _record(image_id: int, boxes: list, labels: list, crowd: list | None = None,
            crowd_labels: list | None = None) -> ImageRecord:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return ImageRecord(
        image_id=image_id, file=Path(f"/imgs/{image_id}.jpg"), width=200, height=200, boxes=b,
        labels=np.array(labels, np.int64), areas=(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
        crowd_boxes=np.array(crowd or [], np.float32).reshape(-1, 4),
        crowd_labels=np.array(crowd_labels or [0] * len(crowd or []), np.int64),
    )  # fmt: skip


def _toy(records: list[ImageRecord], classes=("cat", "dog"), ids=(7, 3)):
    split = DetectionSplit(name="valid", ann_file=Path("/d/valid/_annotations.coco.json"),
                           img_dir=Path("/imgs"), records=records)  # fmt: skip
    return split, DetectionDataset(classes=list(classes), category_ids=list(ids), splits={"valid": split})


def _dets(boxes: list, scores: list, labels: list) -> Detections:
    return Detections(
        boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
        labels=np.array(labels, np.int64), class_names=["cat", "dog"],
    )  # fmt: skip


def _score(split, dataset, dets_by_id):
    results = detections_to_coco_results(dets_by_id, dataset.category_ids)
    return evaluate_results(coco_gt_from_split(split, dataset), results, dataset.classes,
                            dataset.category_ids)  # fmt: skip


# ---------------------------------------------------------------- exactness


def _facemask_split(use_reader: bool) -> tuple[DetectionSplit, DetectionDataset]:
    if not (FACEMASK / "valid" / "_annotations.coco.json").is_file():
        pytest.skip("shared facemask dataset not present")
    if use_reader:
        coco = pytest.importorskip("rtmdet.data.coco")
        dataset = coco.load_dataset(FACEMASK)
        return dataset.splits["valid"], dataset
    valid = FACEMASK / "valid"
    return _load_raw(valid / "_annotations.coco.json", valid)


@pytest.mark.parametrize("use_reader", [False, True], ids=["hand-records", "load_dataset"])
def test_facemask_matches_pycocotools_exactly(tmp_path, use_reader):
    split, dataset = _facemask_split(use_reader)
    dets = _fake_predictions(split, len(dataset.classes))
    results = detections_to_coco_results(dets, dataset.category_ids)
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))

    ours = evaluate_results(coco_gt_from_split(split, dataset), results, dataset.classes,
                            dataset.category_ids)  # fmt: skip
    # Roboflow numbers annotations from 0, and pycocotools takes a match to annotation id 0 for
    # "no match" (cocoapi#664): on the raw file it drops one true positive. Our ground truth
    # numbers from 1, so we compare with the user's file with only its annotation ids shifted.
    ref_stats, ref = _pycocotools_direct(_ann_ids_from_one(split.ann_file, tmp_path), results_file)

    assert 0.2 < ours.stats["mAP"] < 0.9  # a meaningful, non-trivial score
    # faster-coco-eval (C++) runs pycocotools' algorithm: the same matches and counts, with
    # means taken in another order, so values agree to the last bit or two of a float64.
    assert [ours.stats[n] for n in STAT_NAMES] == pytest.approx([float(v) for v in ref_stats], rel=0, abs=1e-12)
    assert np.allclose(ours.precision, ref.eval["precision"], rtol=0, atol=1e-12)
    assert np.array_equal(ours.precision < 0, ref.eval["precision"] < 0)  # the same "no gt" cells
    ref_cats = list(ref.params.catIds)
    for row in ours.per_class:
        p = ref.eval["precision"][:, :, ref_cats.index(row["category_id"]), 0, -1]
        assert row["AP"] == pytest.approx(float(np.mean(p[p > -1])), rel=0, abs=1e-12)
        assert row["AP50"] == pytest.approx(float(np.mean(p[0][p[0] > -1])), rel=0, abs=1e-12)
        assert not row["absent"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ref.summarize()
    assert ours.summary == buf.getvalue().rstrip("\n")  # pycocotools' 12 lines, character for character


def test_scorer_arrays_path_matches_pycocotools_and_scores_again_alike(tmp_path):
    """Validation's path (one CocoScorer, flat arrays, no loadRes) gives pycocotools' numbers,
    the second time as the first (COCOeval marks the ground truth it reuses)."""
    split, dataset = _facemask_split(True)
    dets = _fake_predictions(split, len(dataset.classes))
    results = detections_to_coco_results(dets, dataset.category_ids)
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    ref_stats, ref = _pycocotools_direct(_ann_ids_from_one(split.ann_file, tmp_path), results_file)

    ids = np.concatenate([np.full(len(d.scores), i) for i, d in dets.items()])
    boxes, scores, labels = (np.concatenate([getattr(d, k) for d in dets.values()]) for k in ("boxes", "scores", "labels"))
    scorer = CocoScorer(coco_gt_from_split(split, dataset), dataset.classes, dataset.category_ids)
    first = scorer.score_arrays(ids, boxes, scores, labels)
    empty = scorer.score_arrays(ids[:0], boxes[:0], scores[:0], labels[:0])
    again = scorer.score_arrays(ids, boxes, scores, labels)
    assert 0.2 < first.stats["mAP"] < 0.9
    assert empty.stats["mAP"] == 0.0
    for ours in (first, again):
        assert [ours.stats[n] for n in STAT_NAMES] == pytest.approx([float(v) for v in ref_stats], rel=0, abs=1e-12)
        assert np.allclose(ours.precision, ref.eval["precision"], rtol=0, atol=1e-12)
        assert np.array_equal(ours.precision < 0, ref.eval["precision"] < 0)
    assert first.results == results


def _ann_ids_from_one(ann_file: Path, tmp_path: Path) -> Path:
    raw = json.loads(ann_file.read_text())
    shift = 1 - min(a["id"] for a in raw["annotations"])
    for a in raw["annotations"]:
        a["id"] += max(shift, 0)
    out = tmp_path / "annotations_ids_from_1.json"
    out.write_text(json.dumps(raw))
    return out


def test_annotation_id_zero_is_matched_unlike_raw_pycocotools(tmp_path):
    """The one deliberate difference from pycocotools on a raw file: its id-0 blind spot."""
    raw = {
        "images": [{"id": 0, "file_name": "0.jpg", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [10, 10, 50, 50],
                         "area": 2500, "iscrowd": 0}],
    }  # fmt: skip
    ann_file = tmp_path / "_annotations.coco.json"
    ann_file.write_text(json.dumps(raw))
    split, dataset = _load_raw(ann_file, tmp_path)
    results = [{"image_id": 0, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9}]
    (tmp_path / "r.json").write_text(json.dumps(results))
    ours = evaluate_results(coco_gt_from_split(split, dataset), results, dataset.classes,
                            dataset.category_ids)  # fmt: skip
    assert ours.stats["mAP"] == pytest.approx(1.0)
    assert _pycocotools_direct(ann_file, tmp_path / "r.json")[0][0] == 0.0  # the perfect hit lost
    fixed = _pycocotools_direct(_ann_ids_from_one(ann_file, tmp_path), tmp_path / "r.json")[0]
    assert fixed[0] == pytest.approx(ours.stats["mAP"], rel=0, abs=1e-12)  # see the facemask test


def test_supercategory_without_boxes_leaves_means_unchanged(tmp_path):
    """Roboflow exports often add a box-less supercategory; our classes drop it, COCO skips it."""
    raw = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 120, "height": 100} for i in (4, 9)],
        "categories": [{"id": 0, "name": "things"}, {"id": 5, "name": "b"}, {"id": 2, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 4, "category_id": 5, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 4, "category_id": 2, "bbox": [50.5, 20, 20, 60], "area": 1200, "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 2, "bbox": [0, 0, 100, 90], "area": 9000, "iscrowd": 0},
            {"id": 4, "image_id": 9, "category_id": 5, "bbox": [5, 5, 8, 8], "area": 64, "iscrowd": 0},
        ],
    }  # fmt: skip
    ann_file = tmp_path / "_annotations.coco.json"
    ann_file.write_text(json.dumps(raw))
    split, dataset = _load_raw(ann_file, tmp_path)
    assert dataset.category_ids == [2, 5]
    dets = {
        4: _dets([[12, 11, 50, 42], [52, 22, 70, 78], [0, 0, 30, 30]], [0.9, 0.8, 0.7], [1, 0, 0]),
        9: _dets([[2, 1, 95, 88], [5, 5, 13, 14]], [0.6, 0.5], [0, 0]),
    }
    results = detections_to_coco_results(dets, dataset.category_ids)
    (tmp_path / "r.json").write_text(json.dumps(results))
    ours = evaluate_results(coco_gt_from_split(split, dataset), results, dataset.classes,
                            dataset.category_ids)  # fmt: skip
    ref_stats, ref = _pycocotools_direct(ann_file, tmp_path / "r.json")
    assert list(ref.params.catIds) == [0, 2, 5]
    assert [ours.stats[n] for n in STAT_NAMES] == [None if v < 0 else float(v) for v in ref_stats]
    assert [row["category_id"] for row in ours.per_class] == [2, 5]


def test_results_use_original_category_ids_and_round():
    dets = {12: _dets([[1.23456, 2.0, 11.0, 22.5]], [0.9876543], [1])}
    (r,) = detections_to_coco_results(dets, [7, 3])
    assert r == {"image_id": 12, "category_id": 3, "bbox": [1.235, 2.0, 9.765, 20.5], "score": 0.98765}
    with pytest.raises(DataError, match="class index 2"):
        detections_to_coco_results({1: _dets([[0, 0, 1, 1]], [0.5], [2])}, [7, 3])


# ---------------------------------------------------------------- edge cases


def test_negative_images_count_false_positives():
    split, dataset = _toy([_record(1, [[10, 10, 60, 60]], [0]), _record(2, [], [])])
    gt = coco_gt_from_split(split, dataset)
    assert [img["id"] for img in gt["images"]] == [1, 2] and len(gt["annotations"]) == 1
    tp = {1: _dets([[10, 10, 60, 60]], [0.8], [0])}
    # A confident false alarm on the negative image outranks the hit: precision 0.5 everywhere.
    r = _score(split, dataset, {**tp, 2: _dets([[0, 0, 50, 50]], [0.9], [0])})
    assert r.stats["mAP"] == pytest.approx(0.5)
    r = _score(split, dataset, {**tp, 2: _dets([[0, 0, 50, 50]], [0.1], [0])})
    assert r.stats["mAP"] == pytest.approx(1.0)
    r = _score(split, dataset, {**tp, 2: _dets([], [], [])})
    assert r.stats["mAP"] == pytest.approx(1.0)


def test_absent_class_is_reported_absent_not_minus_one():
    split, dataset = _toy([_record(1, [[10, 10, 60, 60]], [0])])
    # A false positive of the absent class must not crash nor drag the mean (COCO ignores it).
    r = _score(split, dataset, {1: _dets([[10, 10, 60, 60], [100, 100, 150, 150]], [0.9, 0.8], [0, 1])})
    cat, dog = r.per_class
    assert cat == {"name": "cat", "category_id": 7, "AP": pytest.approx(1.0), "AP50": pytest.approx(1.0),
                   "num_gt": 1, "absent": False}  # fmt: skip
    assert dog == {"name": "dog", "category_id": 3, "AP": None, "AP50": None, "num_gt": 0, "absent": True}
    assert r.stats["mAP"] == pytest.approx(1.0)
    assert r.stats["mAP_small"] is None and r.stats["mAP_large"] is None  # 50x50 is medium
    metrics = r.to_metrics()
    assert metrics["AP/dog"] is None and metrics["AP50/cat"] == pytest.approx(1.0)
    json.dumps(metrics, allow_nan=False)  # stays valid JSON
    assert r.pr_curve(1) is None
    recall, precision = r.pr_curve(0)
    assert recall.shape == precision.shape == (101,) and np.allclose(precision, 1.0)
    assert "(absent from this split)" in format_coco_table(r)


def test_model_that_predicts_nothing_scores_zero():
    split, dataset = _toy([_record(1, [[10, 10, 60, 60]], [0]), _record(2, [[0, 0, 100, 120]], [1])])
    r = _score(split, dataset, {1: _dets([], [], []), 2: _dets([], [], [])})
    assert r.results == []
    for name in STAT_NAMES:
        assert r.stats[name] == (None if name in ("mAP_small", "AR_small") else 0.0)
    assert [row["AP"] for row in r.per_class] == [0.0, 0.0]
    json.dumps(r.to_metrics(), allow_nan=False)


def test_detections_on_unknown_image_id_is_a_clear_error():
    split, dataset = _toy([_record(1, [[10, 10, 60, 60]], [0])])
    with pytest.raises(DataError, match=r"image id 99, which is not an image of split 'valid'"):
        _score(split, dataset, {1: _dets([], [], []), 99: _dets([[0, 0, 5, 5]], [0.5], [0])})
    bad = [{"image_id": 1, "category_id": 4, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(DataError, match="category id 4"):
        evaluate_results(coco_gt_from_split(split, dataset), bad, dataset.classes, dataset.category_ids)


def test_crowd_regions_are_ignored():
    split, dataset = _toy([_record(1, [[10, 10, 60, 60]], [0], crowd=[[100, 100, 190, 190]], crowd_labels=[0])])
    gt = coco_gt_from_split(split, dataset)
    assert sorted((a["iscrowd"], a["category_id"]) for a in gt["annotations"]) == [(0, 7), (1, 7)]
    r = _score(split, dataset, {1: _dets([[105, 105, 185, 185], [10, 10, 60, 60]], [0.9, 0.8], [0, 0])})
    assert r.stats["mAP"] == pytest.approx(1.0)
    assert r.per_class[0]["num_gt"] == 1


def test_evaluate_results_leaves_inputs_untouched():
    split, dataset = _toy([_record(1, [[10, 10, 60, 60]], [0])])
    gt = coco_gt_from_split(split, dataset)
    results = detections_to_coco_results({1: _dets([[10, 10, 60, 60]], [0.9], [0])}, dataset.category_ids)
    before = json.dumps([gt, results])
    evaluate_results(gt, results, dataset.classes, dataset.category_ids)
    assert json.dumps([gt, results]) == before


# ---------------------------------------------------------------- detector loop and output


class _PerfectDetector:
    """Returns each image's ground truth, so mAP must be 1."""

    class_names = ["cat", "dog"]

    def __init__(self, records: list[ImageRecord]):
        self.by_file = {r.file: r for r in records}
        self.batches: list[int] = []

    def __call__(self, paths: list[Path]) -> list[Detections]:
        self.batches.append(len(paths))
        recs = [self.by_file[p] for p in paths]
        return [_dets(r.boxes, np.linspace(0.9, 0.5, len(r.boxes)), r.labels) for r in recs]


def test_evaluate_detector_runs_batches_and_times_them():
    records = [_record(i, [[10, 10, 60, 60 + i]], [i % 2]) for i in range(1, 6)] + [_record(6, [], [])]
    split, dataset = _toy(records)
    det = _PerfectDetector(records)
    r = evaluate_detector(det, split, dataset, batch_size=4, progress=False)
    assert det.batches == [4, 2]
    assert r.stats["mAP"] == pytest.approx(1.0) and r.stats["AR100"] == pytest.approx(1.0)
    assert r.images_per_s > 0 and r.seconds > 0 and r.num_images == 6
    assert sorted(r.detections) == [1, 2, 3, 4, 5, 6] and len(r.results) == 5
    assert {res["category_id"] for res in r.results} == {7, 3}
    metrics = r.to_metrics()
    assert list(metrics)[:12] == list(STAT_NAMES)
    assert {"AP/cat", "AP/dog", "AP50/cat", "AP50/dog", "images_per_s"} <= set(metrics)


def test_evaluate_detector_rejects_other_classes():
    split, dataset = _toy([_record(1, [[10, 10, 60, 60]], [0])])
    det = _PerfectDetector(split.records)
    det.class_names = ["person", "car"]
    with pytest.raises(DataError, match="differ from the classes"):
        evaluate_detector(det, split, dataset, progress=False)


def test_format_coco_table_has_the_familiar_lines():
    split, dataset = _toy([_record(1, [[10, 10, 60, 60]], [0]), _record(2, [[0, 0, 100, 120]], [1])])
    r = _score(split, dataset, {1: _dets([[10, 10, 60, 58]], [0.9], [0]), 2: _dets([], [], [])})
    text = format_coco_table(r)
    lines = text.splitlines()
    assert lines[0] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = " + (
        f"{r.stats['mAP']:0.3f}"
    )
    assert lines[3].endswith("area= small | maxDets=100 ] =   n/a")
    ar1 = f"{r.stats['AR1']:0.3f}"
    assert lines[6] == f" Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = {ar1}"
    # Our 12 lines are pycocotools' own, except n/a where it prints -1.000.
    assert [ln for i, ln in enumerate(lines[:12]) if i not in (3, 9)] == [
        ln for i, ln in enumerate(r.summary.splitlines()) if i not in (3, 9)
    ]
    assert any(ln.startswith("cat ") and ln.split()[1:] == ["1", f"{r.per_class[0]['AP']:.3f}", "1.000"]
               for ln in lines)  # fmt: skip
