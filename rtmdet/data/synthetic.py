"""The embedded default dataset: coloured shapes on textured backgrounds, made from a seed.

`make_synthetic_dataset(out_dir, seed)` writes a Roboflow-style COCO export (train/ and valid/,
each with `_annotations.coco.json` and JPEG images, plus Roboflow's unused supercategory id 0),
so the same reader that reads users' exports reads it. Four classes that differ only by shape
(circle, square, triangle, cross); colours, sizes, rotations, backgrounds and occlusion vary.
The task is meant to be learnable by a nano model at 192 px in minutes on a CPU: objects are
mostly 12-45 % of the image side (a fifth are smaller), 1-6 per image, ~7 % images empty.
Each annotation's `segmentation` holds the object's visible pixels as polygons (what a Roboflow
segmentation export writes), for the segment task.

    python -m rtmdet.data.synthetic OUT_DIR [--seed 0] [--train 400] [--valid 100]

Same seed, same OpenCV build -> byte-identical files (every image has its own seeded Generator).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle", "cross")
SUPERCATEGORY = "shapes"
DATE = "2024-01-01T00:00:00+00:00"  # fixed, so the JSON is reproducible
MIN_VISIBLE = 0.6  # an object keeps at least this fraction of its area when overlapped
_SHIFT = 4  # cv2 sub-pixel bits for polygon vertices
_PREFIX = {"train": 1, "valid": 2, "test": 3}


@dataclass
class SyntheticImage:
    """One rendered image (BGR uint8), its boxes (int xyxy), labels, and the object-id map."""

    image: np.ndarray
    boxes: np.ndarray  # [K, 4] int64, tight around each object's visible pixels
    labels: np.ndarray  # [K] int64 indices into CLASSES
    id_map: np.ndarray  # HxW int16: object index at each pixel, -1 for background
    objects: np.ndarray | None = None  # [K] int64: the id_map index of each box's object


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth colour field with a few random lines: texture that is not an object."""
    base = rng.uniform(30, 225, 3)
    grid = rng.uniform(-1, 1, (int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3)) * rng.uniform(20, 70)
    field = cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    image = np.clip(base + field, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 5))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(image, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return image


def _rotated(points: np.ndarray, angle: float, centre: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = points @ np.array([[c, s], [-s, c]])
    return rot + np.array(centre)


def _shape_mask(label: int, size: float, centre: tuple[float, float], rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Filled mask of one shape of about `size` px across (no anti-aliasing: exact edges)."""
    mask = np.zeros((h, w), np.uint8)
    r = size / 2
    angle = math.radians(rng.uniform(-30, 30))
    name = CLASSES[label]
    if name == "circle":
        axes = (max(int(r), 2), max(int(r * rng.uniform(0.85, 1.15)), 2))
        cv2.ellipse(mask, (int(centre[0]), int(centre[1])), axes, math.degrees(angle), 0, 360, 1, -1)
        return mask.astype(bool)
    if name == "square":
        a, b = r * rng.uniform(0.85, 1.0), r * rng.uniform(0.85, 1.0)
        polys = [np.array([[-a, -b], [a, -b], [a, b], [-a, b]])]
    elif name == "triangle":
        turn = angle + math.radians(rng.choice([-90, 90]))
        polys = [np.array([[r * math.cos(t), r * math.sin(t)] for t in (turn, turn + 2.094, turn + 4.189)])]
    else:  # cross: two bars
        arm = r * rng.uniform(0.28, 0.38)
        polys = [np.array([[-r, -arm], [r, -arm], [r, arm], [-r, arm]]), np.array([[-arm, -r], [arm, -r], [arm, r], [-arm, r]])]
    for poly in polys:  # one call per polygon: a single call would leave the cross's overlap empty
        pts = np.round(_rotated(poly, angle, centre) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.astype(bool)


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random saturated colour that stands out from the background it covers."""
    colour = under
    for _ in range(12):
        hsv = np.uint8([[[rng.integers(0, 180), rng.integers(90, 256), rng.integers(70, 256)]]])
        colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)
        if np.abs(colour - under).sum() >= 110:
            break
    return colour


def _place(rng: np.random.Generator, w: int, h: int) -> tuple[float, tuple[float, float]]:
    """Size (px across) and centre of a new object, fully inside the image."""
    side = min(w, h)
    frac = rng.uniform(0.06, 0.12) if rng.random() < 0.2 else rng.uniform(0.12, 0.45)
    size = max(frac * side, 8.0)
    margin = size * 0.6
    return size, (rng.uniform(margin, w - margin), rng.uniform(margin, h - margin))


def render_image(rng: np.random.Generator, width: int, height: int, n_objects: int) -> SyntheticImage:
    """Draw up to n_objects shapes; an object is dropped when it cannot be placed without hiding
    more than 1 - MIN_VISIBLE of one already drawn."""
    image = _background(rng, width, height).astype(np.float64)
    id_map = np.full((height, width), -1, np.int16)
    areas: list[int] = []
    labels: list[int] = []
    for _ in range(n_objects):
        label = int(rng.integers(0, len(CLASSES)))
        for _attempt in range(20):
            size, centre = _place(rng, width, height)
            mask = _shape_mask(label, size, centre, rng, width, height)
            hidden = np.bincount(id_map[mask].astype(np.int64) + 1, minlength=len(areas) + 1)[1:]
            visible = np.bincount(id_map.ravel().astype(np.int64) + 1, minlength=len(areas) + 1)[1:]
            if mask.any() and all(v - d >= MIN_VISIBLE * a for v, d, a in zip(visible, hidden, areas)):
                break
        else:
            continue
        colour = _object_colour(rng, image[mask].mean(axis=0))
        # A soft linear shading across the object so it is not perfectly flat.
        ys, xs = np.nonzero(mask)
        direction = rng.normal(size=2)
        ramp = (xs * direction[0] + ys * direction[1]) / (np.hypot(*direction) * max(size, 1.0))
        shade = 1.0 + 0.25 * (ramp - ramp.mean())
        image[ys, xs] = np.clip(colour[None, :] * shade[:, None], 0, 255)
        id_map[mask] = len(areas)
        areas.append(int(mask.sum()))
        labels.append(label)
    image += rng.normal(0, rng.uniform(2, 10), image.shape)
    boxes, kept, objects = [], [], []
    for k in range(len(areas)):
        ys, xs = np.nonzero(id_map == k)
        if len(xs):
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            kept.append(labels[k])
            objects.append(k)
    return SyntheticImage(
        np.clip(image, 0, 255).astype(np.uint8),
        np.array(boxes, np.int64).reshape(-1, 4),
        np.array(kept, np.int64),
        id_map,
        np.array(objects, np.int64),
    )


def visible_polygons(mask: np.ndarray) -> list[list[float]]:
    """An object's visible pixels as Roboflow-style polygons (outer contours, x1 y1 x2 y2 ...)
    through the boundary pixels' centres (+0.5: pycocotools rasterizes them back closest to the
    pixels, median IoU 0.96 vs 0.95 without); parts under 3 points are left out."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [(c.reshape(-1) + 0.5).tolist() for c in contours if len(c) >= 3]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of one image of one split."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _PREFIX[split], index])))


def synthesize(seed: int, split: str, index: int, empty_fraction: float = 0.07) -> SyntheticImage:
    """Image `index` of `split`: 240-400 px each side, 0 objects with p=empty_fraction, else 1-6."""
    rng = image_rng(seed, split, index)
    w, h = int(rng.integers(240, 401)), int(rng.integers(240, 401))
    n = 0 if rng.random() < empty_fraction else int(rng.choice([1, 2, 2, 3, 3, 3, 4, 4, 5, 6]))
    return render_image(rng, w, h, n)


def _split_json(seed: int, split: str, count: int, folder: Path, empty_fraction: float, quality: int) -> dict:
    images, annotations = [], []
    for i in range(count):
        synth = synthesize(seed, split, i, empty_fraction)
        h, w = synth.image.shape[:2]
        digest = hashlib.md5(f"{seed}/{split}/{i}".encode()).hexdigest()
        name = f"shapes_{i:04d}_png.rf.{digest}.jpg"
        ok, data = cv2.imencode(".jpg", synth.image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok, "OpenCV could not encode a JPEG"
        (folder / name).write_bytes(data.tobytes())
        images.append({"id": i, "license": 1, "file_name": name, "height": h, "width": w, "date_captured": DATE})
        for k, (x1, y1, x2, y2), label in zip(synth.objects.tolist(), synth.boxes.tolist(), synth.labels.tolist()):
            annotations.append({
                "id": len(annotations), "image_id": i, "category_id": label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "segmentation": visible_polygons(synth.id_map == k), "iscrowd": 0,
            })
    categories = [{"id": 0, "name": SUPERCATEGORY, "supercategory": "none"}]
    categories += [{"id": k + 1, "name": n, "supercategory": SUPERCATEGORY} for k, n in enumerate(CLASSES)]
    return {
        "info": {"year": "2024", "version": "1", "description": f"rtmdet synthetic shapes, seed {seed}",
                 "contributor": "", "url": "", "date_created": DATE},
        "licenses": [{"id": 1, "url": "https://creativecommons.org/publicdomain/zero/1.0/", "name": "Public Domain"}],
        "categories": categories,
        "images": images,
        "annotations": annotations,
    }


def make_synthetic_dataset(
    out_dir: str | Path,
    seed: int = 0,
    *,
    train: int = 400,
    valid: int = 100,
    empty_fraction: float = 0.07,
    quality: int = 95,
) -> Path:
    """Write the shapes dataset in the Roboflow layout under out_dir; returns out_dir.

    Each split is built in a temporary folder and then moved into place, replacing an older
    out_dir/train or out_dir/valid, so an interrupted run never leaves a half-written split.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("valid", valid)):
        tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=out))
        try:
            coco = _split_json(seed, split, count, tmp, empty_fraction, quality)
            (tmp / "_annotations.coco.json").write_text(json.dumps(coco, separators=(",", ":")))
            if (out / split).exists():
                shutil.rmtree(out / split)
            tmp.rename(out / split)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m rtmdet.data.synthetic OUT_DIR [--seed] [--train] [--valid]."""
    parser = argparse.ArgumentParser(prog="python -m rtmdet.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400, help="number of training images")
    parser.add_argument("--valid", type=int, default=100, help="number of validation images")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    make_synthetic_dataset(args.out_dir, args.seed, train=args.train, valid=args.valid)
    print(f"wrote {args.train} train + {args.valid} valid images to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s (classes: {', '.join(CLASSES)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
