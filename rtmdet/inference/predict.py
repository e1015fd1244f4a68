"""`rtmdet predict`: run a checkpoint or an AOTInductor export on an image or a folder, draw results,
write COCO-style JSON."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rtmdet.errors import ConfigError, DataError
from rtmdet.imageio import IMAGE_SUFFIXES, list_images, read_image

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="detect objects in an image or a folder of images")
    p.add_argument("--weights", required=True, type=Path,
                   help="checkpoint (.pt/.pth, rtmdet or mmdetection) or AOTInductor export (.pt2, with its "
                        ".json sidecar)")
    p.add_argument("--source", required=True, type=Path, help="an image file or a folder (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder for drawn images and predictions.json")
    p.add_argument("--score-thr", type=float, default=0.3, help="minimum score to keep (default 0.3)")
    p.add_argument("--iou-thr", type=float, default=0.65, help="NMS IoU threshold (default 0.65)")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image (default 300)")
    p.add_argument("--imgsz", type=int, default=None, help="inference size (default: the checkpoint's; an export's "
                   "is fixed)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu); a checkpoint's: an "
                   "export runs where its runtime does (.pt2: the device it was compiled for)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="a checkpoint on CUDA: weights and activations of the fast path (default fp32)")
    p.add_argument("--compile", choices=("off", "default", "max-autotune"), default="off",
                   help="a checkpoint: compile the fast path with TorchInductor first (seconds to minutes, once; "
                        "default off)")
    p.set_defaults(func=run)


def resolve_device(device: str) -> str:
    """A validated device string for --device (auto, cpu, cuda, cuda:N); one clear error otherwise."""
    from rtmdet.training.distributed import resolve_device as resolve

    return str(resolve(device, what="--device"))


def source_images(source: Path) -> list[Path]:
    """The images named by --source: one file, or every image under a folder."""
    if source.is_dir():
        files = list_images(source)
        if not files:
            raise DataError(f"{source}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        return files
    if not source.exists():
        raise DataError(f"{source}: no such image file or folder")
    return [source]


def run(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    from rtmdet.data.masks import rle_to_mask
    from rtmdet.inference.predictor import Detector
    from rtmdet.visualize import draw_boxes, draw_masks

    device = resolve_device(args.device)
    if args.imgsz is not None and args.imgsz % 32:
        raise ConfigError(f"--imgsz {args.imgsz} is not a multiple of 32")
    fast = {}
    if (args.precision, args.compile) != ("fp32", "off"):
        if args.weights.suffix.lower() == ".pt2":
            raise ConfigError(f"{args.weights}: --precision and --compile apply to checkpoints; an AOTInductor "
                              "package is compiled already")
        fast = dict(dtype=args.precision, compile=args.compile)
    detector = Detector.from_file(
        args.weights, device=device, image_size=args.imgsz, batch_size=args.batch_size,
        score_thr=args.score_thr, iou_thr=args.iou_thr, max_per_img=args.max_det, **fast)
    files = source_images(args.source)
    base = args.source if args.source.is_dir() else args.source.parent
    args.out.mkdir(parents=True, exist_ok=True)
    results, n_boxes = [], 0
    for image_id, path in enumerate(tqdm(files, desc="predict", unit="img", disable=len(files) < 2)):
        image = read_image(path)
        det = detector(image)
        rel = path.relative_to(base)
        out_file = args.out / rel.with_suffix(".jpg")
        out_file.parent.mkdir(parents=True, exist_ok=True)
        canvas = image if det.masks is None else draw_masks(image, [rle_to_mask(r) for r in det.masks], det.labels)
        cv2.imwrite(str(out_file), draw_boxes(canvas, det.boxes, det.labels, det.class_names, det.scores))
        for k, (box, score, label) in enumerate(zip(det.boxes, det.scores, det.labels)):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": image_id, "file_name": rel.as_posix(), "category_id": int(label),
                            "category_name": det.class_names[int(label)],
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": round(float(score), 5)})
            if det.masks is not None:  # a segment model: the instance's mask, a COCO RLE
                results[-1]["segmentation"] = det.masks[k]
        n_boxes += len(det)
    (args.out / "predictions.json").write_text(json.dumps(results, indent=1))
    print(f"{len(files)} images, {n_boxes} detections -> {args.out} (predictions.json)")
    return 0
