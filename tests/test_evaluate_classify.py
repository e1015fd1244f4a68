"""The evaluate stage on a CSPNeXt classifier checkpoint: the dispatch, the metrics file, every
report, the worst-images grid and the split errors (rtmdet.evaluation.classify_stage)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rtmdet.data.class_folders import load_class_folders
from rtmdet.data.class_transforms import eval_transform
from rtmdet.errors import DataError
from rtmdet.evaluation.classification import classification_result
from rtmdet.evaluation.classify_stage import TILE
from rtmdet.evaluation.stage import METRICS_FILE, REPORT_DIR, run_evaluation
from rtmdet.export.classify import score_classifier
from rtmdet.imageio import read_image
from rtmdet.models import build_classifier
from rtmdet.models.checkpoint import load_classifier, save_classifier_checkpoint

CLASSES = ["a", "b", "c"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]  # BGR, one per class: saturated, unlike text
VAL_COUNTS = {"a": 2, "b": 3, "c": 4}  # different supports, so a per-class mix-up would show
BATCH = 4


def _write_images(folder: Path, counts: dict[str, int], rng: np.random.Generator) -> None:
    for label, name in enumerate(CLASSES):
        for i in range(counts.get(name, 0)):
            (folder / name).mkdir(parents=True, exist_ok=True)
            noise = rng.integers(-25, 26, (32, 32, 3))
            image = np.clip(np.array(COLOURS[label]) + noise, 0, 255).astype(np.uint8)
            assert cv2.imwrite(str(folder / name / f"{name}{i}.png"), image)


def _make_dataset(root: Path, val: dict[str, int] | None) -> Path:
    rng = np.random.default_rng(0)
    _write_images(root / "train", dict.fromkeys(CLASSES, 2), rng)
    if val is not None:
        _write_images(root / "val", val, rng)
    return root


def _checkpoint(path: Path, always: int | None = None, classes: list[str] = CLASSES, fit: Path | None = None) -> Path:
    """A nano classifier that always says `always`, or whose head is fitted (least squares on the
    pooled features) to the train images of `fit` with class c taught as b: right on a and b, wrong on c."""
    torch.manual_seed(0)
    model = build_classifier("nano", 3, image_size=32).eval()
    with torch.no_grad():
        if always is not None:
            model.head.fc.weight.zero_()
            model.head.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(always), 3).float() * 5.0)
        elif fit is not None:
            _fit_head(model, sorted((fit / "train").glob("*/*.png")), {"a": 0, "b": 1, "c": 1})
    return save_classifier_checkpoint(model, classes, path)


def _fit_head(model, files: list[Path], target: dict[str, int]) -> None:
    batch = np.stack([eval_transform(read_image(f), 32) for f in files])
    feats = model.features(model.normalize(torch.from_numpy(batch).permute(0, 3, 1, 2)))
    x = torch.cat([feats, torch.ones(len(files), 1)], 1).double()
    y = torch.nn.functional.one_hot(torch.tensor([target[f.parent.name] for f in files]), 3).double() * 4.0
    w = torch.linalg.pinv(x) @ y  # minimum-norm exact fit of 6 points: logits 4 for the taught class
    model.head.fc.weight.copy_(w[:-1].T.float())
    model.head.fc.bias.copy_(w[-1].float())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("classes"), VAL_COUNTS)


def _read_json(path: Path):
    def no_nan(token):
        raise AssertionError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=no_nan)


def _tiles(png: Path) -> int:
    """Tiles in a worst-images grid: image-sized blobs of the saturated test colours (text is small)."""
    image = cv2.imread(str(png))
    assert image is not None, png
    saturated = (image.max(2).astype(int) - image.min(2)) > 80
    n, _, stats, _ = cv2.connectedComponentsWithStats(saturated.astype(np.uint8), connectivity=4)
    return int((stats[1:, cv2.CC_STAT_AREA] > TILE * TILE // 2).sum())


def _logits(path: Path, files: list[Path]) -> np.ndarray:
    """The model's logits computed here, batch by batch as the stage does."""
    model, _ = load_classifier(path)
    out = []
    with torch.no_grad():
        for i in range(0, len(files), BATCH):
            batch = np.stack([eval_transform(read_image(f), 32) for f in files[i : i + BATCH]])
            out.append(model(model.normalize(torch.from_numpy(batch).permute(0, 3, 1, 2))).numpy())
    return np.concatenate(out)


def test_classifier_reports_and_metrics(data_root, tmp_path):
    weights = _checkpoint(tmp_path / "best.pt", fit=data_root)
    dataset = load_class_folders(data_root)
    out = tmp_path / "reports"
    results = run_evaluation(weights, dataset, out, splits=("valid", "test"), grid_images=16, batch_size=BATCH,
                             progress=False)
    metrics = _read_json(out / METRICS_FILE)
    assert list(metrics) == ["valid"] and list(results) == ["valid"]  # the asked name; no test/ folder
    images = dataset.splits["val"].images
    expected = classification_result(_logits(weights, [im.file for im in images]),
                                     np.array([im.label for im in images]), CLASSES)
    got = metrics["valid"]
    assert got["num_images"] == sum(VAL_COUNTS.values()) and got["images_per_s"] > 0
    assert {k: got[k] for k in expected.metrics()} == pytest.approx(expected.metrics(), abs=1e-9)
    assert got["top1"] == score_classifier(weights, dataset, "val", batch_size=BATCH).top1
    folder = out / REPORT_DIR
    with open(folder / "per_class_valid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == CLASSES
    assert [int(r["support"]) for r in rows] == [len(list((data_root / "val" / c).glob("*.png"))) for c in CLASSES]
    assert [r["support"] for r in _read_json(folder / "per_class_valid.json")] == [2, 3, 4]
    for png in ("confusion_valid.png", "worst_valid.png"):
        assert cv2.imread(str(folder / png)) is not None, png
    wrong = int((expected.confusion.sum() - np.trace(expected.confusion)))
    assert 0 < wrong < got["num_images"]  # the fitted head is right on some images and wrong on others
    assert _tiles(folder / "worst_valid.png") == wrong


@pytest.mark.parametrize("grid_images", [5, 16])
def test_worst_grid_has_one_tile_per_wrong_image(data_root, tmp_path, grid_images):
    weights = _checkpoint(tmp_path / "best.pt", always=0)  # right on the 2 a's, wrong on the 7 others
    out = tmp_path / "reports"
    run_evaluation(weights, data_root, out, splits=("valid",), grid_images=grid_images, batch_size=BATCH,
                   progress=False)
    got = _read_json(out / METRICS_FILE)["valid"]
    assert got["top1"] == pytest.approx(2 / 9) and got["recall/a"] == 1.0 and got["recall/c"] == 0.0
    assert got["top5"] is None  # 3 classes: no top-5, and null rather than NaN
    assert _tiles(out / REPORT_DIR / "worst_valid.png") == min(7, grid_images)


def test_all_correct_split_writes_an_empty_grid(tmp_path):
    root = _make_dataset(tmp_path / "data", {"a": 3})
    weights = _checkpoint(tmp_path / "best.pt", always=0)
    out = tmp_path / "reports"
    run_evaluation(weights, root, out, splits=("val",), grid_images=16, progress=False)
    assert list(_read_json(out / METRICS_FILE)) == ["val"]  # asked as "val": keyed "val"
    assert _read_json(out / METRICS_FILE)["val"]["top1"] == 1.0
    assert _tiles(out / REPORT_DIR / "worst_val.png") == 0


def test_missing_splits_are_one_line_errors(tmp_path):
    root = _make_dataset(tmp_path / "data", None)  # train/ only
    weights = _checkpoint(tmp_path / "best.pt")
    out = tmp_path / "reports"
    with pytest.raises(DataError) as info:
        run_evaluation(weights, root, out, splits=("valid", "test"), progress=False)
    message = str(info.value)
    assert "\n" not in message and "no valid or test split" in message and "(it has: train)" in message
    _write_images(root / "val", {"a": 1, "b": 1}, np.random.default_rng(1))
    with pytest.raises(DataError, match=r"no test split \(it has: train, val\)"):
        run_evaluation(weights, root, out, splits=("valid", "test"), require_all=True, progress=False)
    assert not out.exists()


def test_other_classes_than_the_dataset_are_refused(data_root, tmp_path):
    weights = _checkpoint(tmp_path / "best.pt", classes=["x", "y", "z"])
    with pytest.raises(DataError, match="are not those of"):
        run_evaluation(weights, data_root, tmp_path / "reports", splits=("valid",), progress=False)
    assert not (tmp_path / "reports").exists()
