"""RTMDet against Ultralytics YOLO11n, trained from scratch side by side on one dataset.

    python benchmarks/peer_yolo.py --data ROOT [--epochs 100] [--batch 32] [--pairs tiny:320 nano:192 nano-silu:192]
        [--workers N] [--seed 0] [--out DIR] [--only rtmdet|yolo] [--rtmdet-set train.lr=0.004 ...]
        [--wheels DIR] [--keep-weights] [--task detect|segment|classify|rotate]
    python benchmarks/peer_yolo.py --merge A/peer_yolo.json B/peer_yolo.json [--out DIR]

ROOT is a Roboflow COCO export (train/ and valid/ with _annotations.coco.json). For each pair
SIZE[-ACT]:IMGSZ it trains RTMDet-SIZE (rtmdet.training.train with RTMDET_RECIPE; -ACT, e.g. -silu,
replaces the size's activation: nano-silu is SSCMA's nano with SiLU instead of ReLU6) and, once per
image size, YOLO11n (built from
yolo11n.yaml, ultralytics' defaults, per-epoch validation on) at IMGSZ for the same epochs, batch
and seed, each in its own child process so wall time and peak GPU memory are its own. Then both
best checkpoints are scored on valid by the same pycocotools code (score_detections) at score
threshold 0.001, NMS IoU 0.65, 100 detections per image; YOLO through its own predictor
(square letterbox, single-label NMS), RTMDet through rtmdet's Detector.

Columns: wall s is the whole train call (data setup, training and the in-training validations;
for YOLO also its final re-validation of best.pt); img/s = epochs x train images / wall s;
peak mem is torch.cuda.max_memory_allocated over training; params are those of the trained model
(3-class heads, BatchNorm not folded). Writes OUT/peer_yolo.json and the children's logs in OUT/logs.

--task segment is the instance-segmentation pair: RTMDet-Ins-SIZE (model.task=segment, the same
recipe) against YOLO11n-seg (yolo11n-seg.yaml; labels are the annotations' polygons, several parts
of one instance joined as ultralytics' own COCO converter joins them). Both are scored by one
pycocotools call per iou type: box (bbox) and mask (segm, each detection's mask at the original
image size as an RLE; YOLO's with retina_masks, i.e. upsampled to the original image as its own
validator does for its final metrics). The table gains mask mAP50-95 and mask mAP50, the pair line
the mask ratio.

--task classify is the image-classification pair: the CSPNeXt-SIZE classifier (model.task=classify,
rtmdet.training.train, through train_on_gpus as above, with RTMDET_CLS_RECIPE, its small-data
schedule) against YOLO11n-cls (yolo11n-cls.yaml, ultralytics' defaults). ROOT is a class-folder dataset
(ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg or valid/, optional test/), read by
rtmdet.data.class_folders.load_class_folders; pairs are SIZE:IMGSZ (default tiny:224). YOLO trains
on a symlinked view of the very images rtmdet reads (train/ and val/, every class folder in both,
so its ImageFolder indices are train's; its scan caches land in scratch, not in ROOT). Both best
checkpoints are scored on val by one scorer, rtmdet.evaluation.classification.classification_result,
each model with its own evaluation pre-process: RTMDet's eval_transform (short edge to
IMGSZ x 256/224, bicubic, centre crop; rtmdet.export.classify.score_classifier), YOLO's predictor
(short edge to IMGSZ, bilinear, centre crop), its probabilities put in the dataset's class order by
name. The table shows top-1 and top-5 (top-5 n/a under 5 classes), the pair line the top-1
difference (RTMDet - YOLO) and the wall-time ratio; ultralytics' own final validation of best.pt
is kept as ultralytics_val.

--task rotate is the rotated-box pair: RTMDet-R-SIZE (model.task=rotate, rtmdet.training.train
through train_on_gpus as above, with RTMDET_ROT_RECIPE: RTMDET_RECIPE without the stage 2 the
rotated pipeline does not have) against YOLO11n-obb (yolo11n-obb.yaml, ultralytics' defaults).
ROOT is a DOTA-layout dataset (ROOT/train/{images,labelTxt}, ROOT/valid/ or val/, optional test/;
label lines x1 y1 x2 y2 x3 y3 x4 y4 class difficult), read by rtmdet.data.dota.load_dota; pairs
are SIZE:IMGSZ (default tiny:640). YOLO trains on a view of the very records rtmdet reads (image
links; labels class x1 y1 ... x4 y4, the corners of each record's rotated box, i.e. load_dota's
minimum-area rectangle of the quad, normalized and clipped to 0..1). Both best checkpoints are
scored on valid (else val) by one scorer, rtmdet.evaluation.rotated_eval.score_rotated (DOTA mAP
as MMRotate's DOTAMetric: VOC07 11-point AP, difficult boxes ignored) at score threshold 0.001,
rotated NMS IoU 0.1 (MMRotate's for RTMDet-R, for both models), 300 detections per image:
RTMDet through evaluate_rotated (letterbox, rtmdet.inference.rotated's post-process), YOLO
through its own predictor, its corner quads turned into rotated boxes by quad_to_rbox (no
dependence on its angle convention). The table shows mAP50:95, mAP50 and mAP75 (11-point) and
mAP50:95 in area mode (under the interpolated curve); the pair line the mAP50:95 ratio, the
mAP50 difference (RTMDet - YOLO) and the wall-time ratio; ultralytics' own final validation of
best.pt is kept as ultralytics_val (not comparable: its OBB validator matches by probabilistic IoU,
more lenient than the exact rotated IoU here, with COCO's 101-point AP).

Ultralytics is a benchmark-only dependency: when it cannot be imported it is installed from the
wheels in --wheels (ultralytics and ultralytics_thop; its other deps must be there already) into the
scratch folder. It runs offline: YOLO_OFFLINE=true, a private YOLO_CONFIG_DIR, integrations
(dvc, mlflow, ...) off, and the two calls that download regardless of YOLO_OFFLINE replaced: the
AMP check (it fetches yolo11n.pt; on CUDA it passes on H100/H200, so AMP is simply on) and the
font check of the dataset check (Arial.ttf, only for plots). Any other network attempt is refused
by an audit hook and listed under network_attempts in the child's result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout, installed or not

from rtmdet.config import parse_section  # noqa: E402 (light: no torch in the parent)
from rtmdet.errors import ConfigError  # noqa: E402
from rtmdet.fileio import write_json_atomic  # noqa: E402

# TrainParams the benchmark uses for RTMDet on small real data (--epochs, --batch, --seed and
# --workers are set from the command line; --rtmdet-set overrides any of these).
# The small-data recipe, tuned on facemask (677 images) at batch 32 on one H100; see README
# "Training on a small dataset". mmdetection's rule (0.004 at 256, i.e. 0.0005 at 32) gave
# tiny@320 0.134 mAP in 100 epochs; 0.004 at 32: 0.334; 0.008: 0.392; 0.016: 0.414; 0.032: 0.402.
RTMDET_RECIPE: dict[str, Any] = {
    "batch_size": 32,
    "lr": 0.016,
    "base_batch_size": 32,
    "warmup_iters": 300,
    "stage2_epochs": 20,
    "val_interval": 10,
    "stage2_val_interval": 5,
    "amp": "auto",
    "channels_last": True,
    "gpus": 1,  # --rtmdet-set train.gpus=2 train.batch_size=16: the same total batch on two GPUs
}
# TrainParams for the classify task (mmpretrain's RSB-A1 augmentation is the trainer's; these are the
# small-data schedule): validation every epoch, as YOLO validates every epoch too. --rtmdet-set
# overrides any of these.
RTMDET_CLS_RECIPE: dict[str, Any] = {
    "lr": 0.002,  # AdamW at batch 64 (YOLO11n-cls's auto optimizer: AdamW 0.001 for 6 classes)
    "base_batch_size": 64,
    "warmup_iters": 300,
    "stage2_epochs": 1000,  # every epoch without RandAugment and Mixup/CutMix: measured better on small data
    "val_interval": 1,
    "stage2_val_interval": 1,
    "amp": "auto",
    "channels_last": True,
    "gpus": 1,
}
# TrainParams for the rotate task: the small-data recipe without stage 2 (the rotated pipeline has
# none), lr 0.008 at 32 (boxes_obb, tiny@640, batch 16, 100 epochs, one seed each: 0.004 at 32 gave
# mAP50:95 0.805, 0.008 0.827; 0.016 was worse before the rtm_reg bias init, not retried).
RTMDET_ROT_RECIPE: dict[str, Any] = {**RTMDET_RECIPE, "lr": 0.008, "stage2_epochs": 0}
SCORE_THR, NMS_IOU, MAX_DETS = 0.001, 0.65, 100
# The rotate task's scoring, the same for both models: 0.1 is MMRotate's nms_rotated IoU for RTMDet-R.
ROT_SCORE_THR, ROT_NMS_IOU, ROT_MAX_DETS = 0.001, 0.1, 300
YOLO_MODELS = {"detect": "yolo11n.yaml", "segment": "yolo11n-seg.yaml", "classify": "yolo11n-cls.yaml",
               "rotate": "yolo11n-obb.yaml"}
DEFAULT_PAIRS = {"detect": [("tiny", 320), ("nano", 192), ("nano-silu", 192)],
                 "segment": [("tiny", 320), ("nano", 192), ("nano-silu", 192)],
                 "classify": [("tiny", 224)],
                 "rotate": [("tiny", 640)]}


def recipe_of(task: str) -> dict[str, Any]:
    """The RTMDet TrainParams recipe of a task (before the command line's values and overrides)."""
    return {"classify": RTMDET_CLS_RECIPE, "rotate": RTMDET_ROT_RECIPE}.get(task, RTMDET_RECIPE)


# ---- parent: run the children, print the table --------------------------------------------------
def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.child:
        return run_child(json.loads(args.child))
    if args.merge:
        return merge(args.merge, args.out.resolve())
    out = args.out.resolve()
    if args.task == "classify":
        check_class_folders(args.data)
    elif args.task == "rotate":
        check_dota(args.data)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="peer_yolo_", dir=args.work))
    try:
        env = child_env(args, work)
        runs, yolo_sizes = [], set()
        for size, imgsz in args.pairs:
            if args.only != "yolo":
                runs.append(run_one(args, "rtmdet", size, imgsz, work, out, env))
            if args.only != "rtmdet" and imgsz not in yolo_sizes:  # one YOLO11n per image size
                yolo_sizes.add(imgsz)
                runs.append(run_one(args, "yolo", size, imgsz, work, out, env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"settings": settings_of(args), "runs": runs, "pairs": pair_ratios(runs)}
    write_json_atomic(out / "peer_yolo.json", report)
    print(format_table(report))
    print(f"\nwrote {out / 'peer_yolo.json'}")
    return 1 if any("error" in r for r in runs) else 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / ".devdata" / "facemask",
                   help="Roboflow COCO export (classify: a class-folder dataset, train/<class>/*.jpg and val/; "
                        "rotate: a DOTA-layout dataset, train/{images,labelTxt} and valid/ or val/)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", nargs="+", type=_pair, default=None,
                   help="RTMDet SIZE[-ACT]:IMGSZ pairs, each against YOLO11n at IMGSZ (default: tiny:320 nano:192 "
                        "nano-silu:192; classify: tiny:224; rotate: tiny:640)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "peer_yolo")
    p.add_argument("--only", choices=("rtmdet", "yolo"))
    p.add_argument("--rtmdet-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="RTMDet overrides: train.<key>=<value> or model.<key>=<value> (YAML values)")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="ultralytics wheels, used when it is missing")
    p.add_argument("--work", type=Path, default=None, help="scratch parent folder (default: the system temp)")
    p.add_argument("--keep-weights", action="store_true",
                   help="copy the best checkpoints to OUT (rtmdet_<size>_<imgsz>.pt, yolo11n_<imgsz>.pt)")
    p.add_argument("--task", choices=("detect", "segment", "classify", "rotate"), default="detect",
                   help="detect: RTMDet vs YOLO11n; segment: RTMDet-Ins vs YOLO11n-seg, scored by box and mask; "
                        "classify: the CSPNeXt classifier vs YOLO11n-cls, scored by top-1/top-5; "
                        "rotate: RTMDet-R vs YOLO11n-obb, scored by DOTA's rotated mAP")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="train nothing: one table from earlier peer_yolo.json files (runs split with --only)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data = args.data.resolve()
    if args.pairs is None:
        args.pairs = list(DEFAULT_PAIRS[args.task])
    args.rtmdet_overrides = _overrides(args.rtmdet_set, args.task)
    return args


ACTIVATIONS = ("silu", "relu", "relu6")  # rtmdet.models.layers.ACTIVATIONS (the parent imports no torch)


def _pair(text: str) -> tuple[str, int]:
    variant, _, imgsz = text.partition(":")
    size, knobs = split_variant(variant)
    if not size or not imgsz.isdigit() or knobs.get("act", "silu") not in ACTIVATIONS:
        raise argparse.ArgumentTypeError(
            f"expected SIZE[-ACT]:IMGSZ such as tiny:320 or nano-silu:192 (ACT: {', '.join(ACTIVATIONS)}), got {text!r}")
    return variant, int(imgsz)


def split_variant(variant: str) -> tuple[str, dict[str, str]]:
    """'nano-silu' -> ('nano', {'act': 'silu'}); 'tiny' -> ('tiny', {})."""
    size, _, act = variant.partition("-")
    return size, ({"act": act} if act else {})


RUN_PREFIX = {"detect": ("", ""), "segment": ("ins_", "seg_"), "classify": ("cls_", "cls_"),
              "rotate": ("r_", "obb_")}  # (rtmdet, yolo)


def rtmdet_run_name(variant: str, imgsz: int, task: str = "detect") -> str:
    """'nano-silu', 192 -> 'rtmdet_nano_silu_192' (work folder, result file and table row);
    the segment task: 'rtmdet_ins_tiny_320'; classify: 'rtmdet_cls_tiny_224'; rotate: 'rtmdet_r_tiny_640'."""
    return f"rtmdet_{RUN_PREFIX[task][0]}{variant.replace('-', '_')}_{imgsz}"


def yolo_run_name(imgsz: int, task: str = "detect") -> str:
    return f"yolo11n_{RUN_PREFIX[task][1]}{imgsz}"


def _overrides(items: list[str], task: str = "detect") -> dict[str, dict[str, Any]]:
    import yaml

    out: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for item in items:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in out or not name:
            raise SystemExit(f"--rtmdet-set {item!r}: expected train.<key>=<value> or model.<key>=<value>")
        out[section][name] = yaml.safe_load(value)
    try:  # a typo fails now, not after the first hours of training
        parse_section("train", {**recipe_of(task), **out["train"]})
        parse_section("model", out["model"])
    except ConfigError as exc:
        raise SystemExit(f"--rtmdet-set: {exc}") from None
    return out


# ultralytics' own dependencies, which the benchmark does not install (import names).
YOLO_DEPS = ("scipy", "seaborn", "cpuinfo", "psutil", "requests", "matplotlib", "pandas", "cv2", "yaml",
             "torchvision")


def check_class_folders(root: Path) -> None:
    """The classify task's dataset, read as the children will read it: fail now, not after training."""
    from rtmdet.data.class_folders import load_class_folders
    from rtmdet.errors import DataError

    try:
        dataset = load_class_folders(root, check_images=False)
    except DataError as exc:
        raise SystemExit(f"--task classify: {exc}") from None
    if "val" not in dataset.splits:
        raise SystemExit(f"--task classify: {dataset.root} has no val/ (or valid/) split to score on")


def check_dota(root: Path) -> None:
    """The rotate task's dataset, read as the children will read it: fail now, not after training."""
    from rtmdet.data.dota import load_dota
    from rtmdet.errors import DataError

    try:
        dataset = load_dota(root)
    except DataError as exc:
        raise SystemExit(f"--task rotate: {exc}") from None
    _val_split(dataset)


def _val_split(dataset: Any) -> Any:
    """The split a rotated dataset is scored on: valid (Roboflow's name), else val (DOTA's); one
    clear line (SystemExit) when it has neither."""
    for name in ("valid", "val"):
        if name in dataset.splits:
            return dataset.splits[name]
    train = dataset.splits.get("train")
    where = train.folder.parent if train is not None else "the dataset"
    raise SystemExit(f"--task rotate: {where} has no valid/ (or val/) split to score on")


def child_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """The children's environment: offline ultralytics with its own config dir, importable."""
    paths = [str(REPO)]
    if args.only != "rtmdet":
        missing = [m for m in YOLO_DEPS if importlib.util.find_spec(m) is None]
        if missing:  # fail before hours of RTMDet training, not after
            raise SystemExit(f"ultralytics needs {', '.join(missing)}, which this Python cannot import")
        if importlib.util.find_spec("ultralytics") is None:
            paths.insert(0, str(install_ultralytics(args.wheels, work / "site")))
    old = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])))
    # 8.3.120 reads YOLO_OFFLINE as the string "true" only ("1" would still probe 1.1.1.1:80).
    env.update(YOLO_OFFLINE="true", YOLO_CONFIG_DIR=str(work / "ultralytics_config"), MPLBACKEND="Agg")
    return env


def install_ultralytics(wheels: Path, target: Path) -> Path:
    files = sorted(wheels.glob("ultralytics-*.whl")) + sorted(wheels.glob("ultralytics_thop-*.whl"))
    if len(files) < 2:
        raise SystemExit(f"{wheels}: ultralytics is not installed and its wheels (ultralytics-*.whl, "
                         "ultralytics_thop-*.whl) are not there; give --wheels DIR")
    print(f"installing {', '.join(f.name for f in files)} into {target}", flush=True)
    if importlib.util.find_spec("pip") is not None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                        "--target", str(target), *map(str, files)], check=True)
    else:  # both are pure-Python wheels: unpacking them is all pip would do
        import zipfile

        for f in files:
            with zipfile.ZipFile(f) as z:
                z.extractall(target)
    return target


def run_one(args: argparse.Namespace, kind: str, size: str, imgsz: int, work: Path, out: Path,
            env: dict[str, str]) -> dict[str, Any]:
    """One (model, size) in a child process; its result dict, or one with 'error' when it failed."""
    name = rtmdet_run_name(size, imgsz, args.task) if kind == "rtmdet" else yolo_run_name(imgsz, args.task)
    spec = {"kind": kind, "task": args.task, "size": size, "imgsz": imgsz, "data": str(args.data), "epochs": args.epochs,
            "batch": args.batch, "seed": args.seed, "workers": args.workers, "work": str(work / name),
            "result": str(work / f"{name}.json"), "overrides": args.rtmdet_overrides,
            "keep": str(out / f"{name}.pt") if args.keep_weights else None}
    log_path = out / "logs" / f"{name}.log"
    print(f"training {name} ({args.epochs} epochs) ... log: {log_path}", flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    result_path = Path(spec["result"])
    if rc != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        print(f"{name} FAILED (exit {rc}); last lines of {log_path}:\n{tail}", flush=True)
        return {"name": name, "kind": kind, "size": size, "imgsz": imgsz, "error": f"exit {rc}, see {log_path}"}
    result = json.loads(result_path.read_text())
    score = (f"top-1 {_f(result['top1'], 4)}" if args.task == "classify" else f"mAP {_f(result['mAP'], 4)}")
    print(f"{name}: {score}, wall {result['wall_s']:.0f} s "
          f"(child {time.perf_counter() - start:.0f} s)", flush=True)
    return result


def merge(files: list[Path], out: Path) -> int:
    """The table and ratios of runs made by several invocations (each under the device time limit)."""
    reports = [json.loads(f.read_text()) for f in files]
    runs = [r for rep in reports for r in rep["runs"]]
    report = {"settings": reports[0]["settings"], "merged_from": [str(f) for f in files], "runs": runs,
              "pairs": pair_ratios(runs)}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "peer_yolo.json", report)
    print(format_table(report))
    print(f"\nwrote {out / 'peer_yolo.json'}")
    return 0


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    if args.task == "classify":
        scoring = {"scorer": "rtmdet.evaluation.classification.classification_result", "split": "val"}
    elif args.task == "rotate":
        scoring = {"scorer": "rtmdet.evaluation.rotated_eval.score_rotated", "split": "valid, else val",
                   "ap_mode": "11points (the *_area entries: area)", "score_thr": ROT_SCORE_THR,
                   "nms_iou": ROT_NMS_IOU, "max_dets": ROT_MAX_DETS}
    else:
        scoring = {"score_thr": SCORE_THR, "nms_iou": NMS_IOU, "max_dets": MAX_DETS}
    return {"task": args.task, "data": str(args.data), "epochs": args.epochs, "batch": args.batch, "seed": args.seed,
            "workers": args.workers, "pairs": [f"{s}:{i}" for s, i in args.pairs],
            "rtmdet_recipe": recipe_of(args.task), "rtmdet_overrides": args.rtmdet_overrides, **scoring}


def pair_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """RTMDet / YOLO mAP and wall time at each image size (and task) where both finished; for
    classify the top-1 and top-5 differences (RTMDet - YOLO) and the wall-time ratio; for rotate
    the mAP50:95 ratio, the mAP50 difference (RTMDet - YOLO) and the wall-time ratio."""
    ok = [r for r in runs if "error" not in r]
    pairs = []
    for r in (r for r in ok if r["kind"] == "rtmdet"):
        y = next((y for y in ok if y["kind"] == "yolo" and y["imgsz"] == r["imgsz"]
                  and y.get("task", "detect") == r.get("task", "detect")), None)
        if y is not None and r.get("task") == "classify":
            pairs.append({"rtmdet": r["name"], "yolo": y["name"], "task": "classify",
                          "top1_diff": _diff(r["top1"], y["top1"]), "top5_diff": _diff(r.get("top5"), y.get("top5")),
                          "time_ratio": _ratio(r["wall_s"], y["wall_s"])})
        elif y is not None and r.get("task") == "rotate":
            pairs.append({"rtmdet": r["name"], "yolo": y["name"], "task": "rotate",
                          "mAP_ratio": _ratio(r["mAP"], y["mAP"]), "mAP50_diff": _diff(r["mAP50"], y["mAP50"]),
                          "time_ratio": _ratio(r["wall_s"], y["wall_s"])})
        elif y is not None:
            pair = {"rtmdet": r["name"], "yolo": y["name"],
                    "mAP_ratio": _ratio(r["mAP"], y["mAP"]), "mAP50_ratio": _ratio(r["mAP50"], y["mAP50"]),
                    "time_ratio": _ratio(r["wall_s"], y["wall_s"])}
            if "mask_mAP" in r and "mask_mAP" in y:
                pair.update(mask_mAP_ratio=_ratio(r["mask_mAP"], y["mask_mAP"]),
                            mask_mAP50_ratio=_ratio(r["mask_mAP50"], y["mask_mAP50"]))
            pairs.append(pair)
    return pairs


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    if s.get("task") == "classify":
        return format_classify_table(report)
    if s.get("task") == "rotate":
        return format_rotate_table(report)
    masks = any("mask_mAP" in r for r in report["runs"])
    mask_head, mask_rule = ("mask mAP50-95 | mask mAP50 | ", "---|---|") if masks else ("", "")
    lines = [f"\n{s['epochs']} epochs, batch {s['batch']}, seed {s['seed']}, {s['workers']} workers; "
             f"valid scored by pycocotools at score {SCORE_THR}, NMS IoU {NMS_IOU}, {MAX_DETS} dets/img",
             f"| model | imgsz | {mask_head}mAP50-95 | mAP50 | mAP_small | wall s (train+val) | img/s | peak mem GiB | params M |",
             f"|---|---|{mask_rule}---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['imgsz']} | failed: {r['error']} | | | | | | |")
            continue
        mask_cells = f"{_f(r.get('mask_mAP'), 4)} | {_f(r.get('mask_mAP50'), 4)} | " if masks else ""
        lines.append(f"| {r['model']} | {r['imgsz']} | {mask_cells}{_f(r['mAP'], 4)} | {_f(r['mAP50'], 4)} | "
                     f"{_f(r['mAP_small'], 4)} | {r['wall_s']:.0f} | {r['images_per_s']:.0f} | "
                     f"{_f(r['peak_mem_gib'], 2)} | {r['params'] / 1e6:.2f} |")
    for p in report["pairs"]:
        mask = (f"mask mAP {_x(p['mask_mAP_ratio'])}, mask mAP50 {_x(p['mask_mAP50_ratio'])}, "
                if "mask_mAP_ratio" in p else "")
        lines.append(f"\n{p['rtmdet']} / {p['yolo']}: {mask}{'box ' if mask else ''}mAP {_x(p['mAP_ratio'])}, "
                     f"{'box ' if mask else ''}mAP50 {_x(p['mAP50_ratio'])}, wall time {_x(p['time_ratio'])}")
    return "\n".join(lines)


def format_classify_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"\n{s['epochs']} epochs, batch {s['batch']}, seed {s['seed']}, {s['workers']} workers; "
             "val scored by rtmdet.evaluation.classification, each model with its own eval pre-process",
             "| model | imgsz | top-1 | top-5 | wall s (train+val) | img/s | peak mem GiB | params M |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['imgsz']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['imgsz']} | {_f(r['top1'], 4)} | {_f(r.get('top5'), 4)} | "
                     f"{r['wall_s']:.0f} | {r['images_per_s']:.0f} | {_f(r['peak_mem_gib'], 2)} | "
                     f"{r['params'] / 1e6:.2f} |")
    for p in report["pairs"]:
        lines.append(f"\n{p['rtmdet']} / {p['yolo']}: top-1 {_d(p['top1_diff'])}, top-5 {_d(p.get('top5_diff'))} "
                     f"(RTMDet - YOLO), wall time {_x(p['time_ratio'])}")
    return "\n".join(lines)


def format_rotate_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"\n{s['epochs']} epochs, batch {s['batch']}, seed {s['seed']}, {s['workers']} workers; "
             f"valid scored by rtmdet.evaluation.rotated_eval (DOTA mAP, VOC07 11-point; area: under the curve) "
             f"at score {ROT_SCORE_THR}, rotated NMS IoU {ROT_NMS_IOU}, {ROT_MAX_DETS} dets/img",
             "| model | imgsz | mAP50:95 | mAP50 | mAP75 | mAP50:95 area | wall s (train+val) | img/s | peak mem GiB "
             "| params M |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['imgsz']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['imgsz']} | {_f(r['mAP'], 4)} | {_f(r['mAP50'], 4)} | "
                     f"{_f(r['mAP75'], 4)} | {_f(r.get('mAP_area'), 4)} | {r['wall_s']:.0f} | "
                     f"{r['images_per_s']:.0f} | {_f(r['peak_mem_gib'], 2)} | {r['params'] / 1e6:.2f} |")
    for p in report["pairs"]:
        lines.append(f"\n{p['rtmdet']} / {p['yolo']}: mAP50:95 {_x(p['mAP_ratio'])}, mAP50 {_d(p['mAP50_diff'])} "
                     f"(RTMDet - YOLO), wall time {_x(p['time_ratio'])}")
    return "\n".join(lines)


def _d(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def _f(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


# ---- child: train and score one model -----------------------------------------------------------
def run_child(spec: dict[str, Any]) -> int:
    import torch

    blocked = forbid_network()
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # anything a library writes next to itself lands in scratch
    task = spec.get("task", "detect")
    ranks = {**recipe_of(task), **spec["overrides"]["train"]}.get("gpus") if spec["kind"] == "rtmdet" else 1
    # Several ranks: this process only launches them; asking CUDA anything here would rule out
    # forking them (RTMDET_RANK_START=fork, rtmdet.training.launch).
    if ranks == 1 and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if task == "classify":
        result = train_rtmdet_classify(spec) if spec["kind"] == "rtmdet" else train_yolo_classify(spec)
    elif task == "rotate":
        result = train_rtmdet(spec) if spec["kind"] == "rtmdet" else train_yolo_obb(spec)
    else:
        result = train_rtmdet(spec) if spec["kind"] == "rtmdet" else train_yolo(spec)
    result.update(kind=spec["kind"], size=spec["size"], imgsz=spec["imgsz"], epochs=spec["epochs"],
                  batch=spec["batch"], seed=spec["seed"], workers=spec["workers"], network_attempts=blocked,
                  device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  torch=torch.__version__)
    write_json_atomic(Path(spec["result"]), result)
    return 0


def forbid_network() -> list[str]:
    """Refuse every non-loopback connection or name lookup in this process; returns the list of
    refused attempts (filled as they happen), so the result says what a library tried."""
    import socket

    blocked: list[str] = []
    local = {None, "", "localhost", "127.0.0.1", "::1"}

    def hook(event: str, args: tuple) -> None:
        if event == "socket.getaddrinfo" and args[0] not in local:
            target = f"lookup {args[0]}:{args[1]}"
        elif (event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6)
              and args[1][0] not in local):
            target = f"connect {args[1][0]}:{args[1][1]}"
        else:
            return
        blocked.append(target)
        print(f"peer_yolo: refused network access ({target})", file=sys.stderr, flush=True)
        raise OSError(f"peer_yolo runs offline: refused {target}")

    sys.addaudithook(hook)
    return blocked


def _peak_mem() -> tuple[float | None, float | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def train_rtmdet(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from rtmdet.config import DataParams, as_dict
    from rtmdet.data.coco import load_dataset
    from rtmdet.data.dota import load_dota
    from rtmdet.training.launch import train_on_gpus

    over = spec["overrides"]
    task = spec.get("task", "detect")
    train_p = parse_section("train", {**recipe_of(task), "epochs": spec["epochs"], "batch_size": spec["batch"],
                                      "seed": spec["seed"], "workers": spec["workers"], **over["train"]})
    size, variant = split_variant(spec["size"])
    model_p = parse_section("model", {"size": size, "imgsz": spec["imgsz"], "task": task, **variant, **over["model"]})
    start = time.perf_counter()
    run = train_on_gpus(DataParams(root=spec["data"]), model_p, train_p, Path(spec["work"]) / "train", progress=False)
    wall = time.perf_counter() - start
    mem, reserved = _peak_mem() if train_p.gpus == 1 else (None, None)  # the ranks' own memory is not seen here
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if task == "rotate":  # a DOTA-layout dataset, scored by score_rotated
        dataset = load_dota(spec["data"])
        result = score_rtmdet_rotated(run.best, dataset, spec["imgsz"], device)
    else:
        dataset = load_dataset(spec["data"], masks=task == "segment")
        result = score_rtmdet(run.best, dataset, spec["imgsz"], device)
    if spec["keep"]:
        shutil.copy2(run.best, spec["keep"])
    n_train = len(dataset.splits["train"].records)
    kind = {"segment": "Ins-", "rotate": "R-"}.get(task, "")
    label = f"RTMDet-{kind}{size}" + (f" ({variant['act']})" if variant else "")
    return {"name": rtmdet_run_name(spec["size"], spec["imgsz"], task), "model": label, "task": task,
            **result, "wall_s": wall, "images_per_s": spec["epochs"] * n_train / wall,
            "peak_mem_gib": mem, "peak_reserved_gib": reserved, "train_images": n_train,
            "best_epoch": run.best_epoch, "train_val_mAP": run.best_mAP,
            "train_loop_images_per_s": run.images_per_s, "train_params": as_dict(train_p),
            "model_params": as_dict(model_p)}


def score_rtmdet(best: Path, dataset: Any, imgsz: int, device: str) -> dict[str, Any]:
    from rtmdet.evaluation.coco_eval import evaluate_detector
    from rtmdet.inference import Detector
    from rtmdet.inference.backends import TorchBackend
    from rtmdet.inference.postprocess import PostprocessConfig
    from rtmdet.inference.postprocess_ins import InsPostprocessConfig
    from rtmdet.models.checkpoint import class_names_of, load_model

    model, ckpt = load_model(best, device, tasks=("detect", "segment"))
    params = sum(p.numel() for p in model.parameters())
    task = model.cfg.task
    post = (InsPostprocessConfig if task == "segment" else PostprocessConfig)(
        score_thr=SCORE_THR, iou_thr=NMS_IOU, max_per_img=MAX_DETS)
    detector = Detector(TorchBackend(model, device), class_names_of(ckpt, model.cfg.num_classes), imgsz,
                        post, batch_size=32, task=task)
    ev = evaluate_detector(detector, dataset.splits["valid"], dataset, batch_size=32, progress=False)
    return {**ev.stats, **_mask_stats(ev), "params": params, "eval_s": ev.seconds, "per_class": ev.per_class}


def score_rtmdet_rotated(best: Path, dataset: Any, imgsz: int, device: str) -> dict[str, Any]:
    """An RTMDet-R checkpoint over valid (else val) through evaluate_rotated, scored by score_rotated."""
    from rtmdet.evaluation.rotated_eval import evaluate_rotated
    from rtmdet.inference.rotated import RotatedPostprocessConfig
    from rtmdet.models.checkpoint import load_model

    model, ckpt = load_model(best, device, tasks=("rotate",))
    if model.cfg.num_classes != len(dataset.classes):
        raise RuntimeError(f"{best}: {model.cfg.num_classes} classes, the dataset has {len(dataset.classes)}")
    params = sum(p.numel() for p in model.parameters())
    split = _val_split(dataset)
    ev = evaluate_rotated(model, split.records, dataset.classes, imgsz, device,
                          RotatedPostprocessConfig(score_thr=ROT_SCORE_THR, iou_thr=ROT_NMS_IOU,
                                                   max_per_img=ROT_MAX_DETS), batch_size=16)
    return {**rotated_stats(ev), "params": params, "eval_s": ev["seconds"], "eval_split": split.name}


def rotated_stats(ev: dict[str, Any]) -> dict[str, Any]:
    """score_rotated's (or evaluate_rotated's) numbers as the run's result entries: mAP (50:95),
    mAP50, mAP75, their *_area twins and per_class; the detections and timings left out."""
    return {k: v for k, v in ev.items() if k not in ("detections", "seconds", "images")}


def _mask_stats(ev: Any) -> dict[str, Any]:
    """The segm scores of an EvalResult as mask_<stat> (and mask_per_class); {} for box models."""
    if ev.masks is None:
        return {}
    return {**{f"mask_{k}": v for k, v in ev.masks.stats.items()}, "mask_per_class": ev.masks.per_class}


def train_rtmdet_classify(spec: dict[str, Any]) -> dict[str, Any]:
    """The CSPNeXt classifier: rtmdet's trainer with model.task=classify, then its best.pt scored on val."""
    from rtmdet.config import DataParams, as_dict
    from rtmdet.data.class_folders import load_class_folders
    from rtmdet.training.launch import train_on_gpus

    over = spec["overrides"]
    train_p = parse_section("train", {**RTMDET_CLS_RECIPE, "epochs": spec["epochs"], "batch_size": spec["batch"],
                                      "seed": spec["seed"], "workers": spec["workers"], **over["train"]})
    size, variant = split_variant(spec["size"])
    model_p = parse_section("model", {"size": size, "imgsz": spec["imgsz"], "task": "classify", **variant,
                                      **over["model"]})
    start = time.perf_counter()
    run = train_on_gpus(DataParams(root=spec["data"]), model_p, train_p, Path(spec["work"]) / "train",
                        live_dir=None, progress=False)
    wall = time.perf_counter() - start
    mem, reserved = _peak_mem() if train_p.gpus == 1 else (None, None)
    best = getattr(run, "best_path", None) or run.best  # TrainResult.best: the best validation's checkpoint
    if best is None:
        raise RuntimeError(f"the classifier run in {run.out_dir} wrote no best checkpoint")
    dataset = load_class_folders(spec["data"])
    result = score_rtmdet_classifier(Path(best), dataset)
    if spec["keep"]:
        shutil.copy2(best, spec["keep"])
    n_train = len(dataset.splits["train"].images)
    label = f"CSPNeXt-{size}-cls" + (f" ({variant['act']})" if variant else "")
    return {"name": rtmdet_run_name(spec["size"], spec["imgsz"], "classify"), "model": label, "task": "classify",
            **result, "wall_s": wall, "images_per_s": spec["epochs"] * n_train / wall,
            "peak_mem_gib": mem, "peak_reserved_gib": reserved, "train_images": n_train,
            "epochs_s": None,  # not seen from here; train_loop_s is the steps' time, without validation
            "train_loop_s": run.seconds, "best_epoch": run.best_epoch,
            "train_val_best": run.best_mAP, "train_val_metrics": _numbers(run.metrics),
            "train_loop_images_per_s": run.images_per_s, "train_params": as_dict(train_p),
            "model_params": as_dict(model_p)}


def score_rtmdet_classifier(best: Path, dataset: Any) -> dict[str, Any]:
    """A classifier checkpoint over val through rtmdet.export.classify.score_classifier (eval_transform)."""
    from rtmdet.export.classify import score_classifier
    from rtmdet.models.checkpoint import class_names_of, load_classifier

    model, ckpt = load_classifier(best, "cpu")
    classes = class_names_of(ckpt, model.cfg.num_classes)
    if classes != list(dataset.classes):
        raise RuntimeError(f"{best}: its classes {classes[:5]} are not the dataset's {dataset.classes[:5]}")
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    res = score_classifier(model, dataset, split="val", batch_size=32)
    return {**classification_stats(res), "params": params, "eval_s": time.perf_counter() - start,
            "eval_imgsz": model.cfg.image_size}


def classification_stats(res: Any) -> dict[str, Any]:
    """A ClassificationResult as the run's result entries: top1, top5, the macro precision / recall
    / F1, per class and the confusion matrix (rows ground truth)."""
    m = res.metrics()
    return {"top1": res.top1, "top5": res.top5, "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
            "per_class": res.per_class, "confusion": res.confusion.tolist()}


def _numbers(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The JSON-ready numbers of a metrics dict."""
    return {str(k): float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_yolo(spec: dict[str, Any]) -> dict[str, Any]:
    import ultralytics
    from ultralytics import YOLO

    from rtmdet.data.coco import load_dataset

    offline_ultralytics()
    task = spec.get("task", "detect")
    dataset = load_dataset(spec["data"], masks=task == "segment")
    data_yaml = write_yolo_dataset(dataset, Path(spec["work"]) / "data", polygons=task == "segment")
    model = YOLO(YOLO_MODELS[task])
    fit = fit_yolo(model, data_yaml, spec)
    trainer = model.trainer
    result = score_yolo(Path(trainer.best), dataset, spec["imgsz"])
    if spec["keep"]:
        shutil.copy2(trainer.best, spec["keep"])
    n_train = len(dataset.splits["train"].records)
    return {"name": yolo_run_name(spec["imgsz"], task), "model": "YOLO11n" + ("-seg" if task == "segment" else ""),
            "task": task, **result, **fit, "images_per_s": spec["epochs"] * n_train / fit["wall_s"],
            "train_images": n_train, "ultralytics_val": _ultralytics_val(trainer), "amp": bool(trainer.amp),
            "ultralytics": ultralytics.__version__}


def fit_yolo(model: Any, data: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """model.train with the benchmark's settings (ultralytics' defaults otherwise, validation every
    epoch, no plots); its wall time, peak memory and the time from the first step to the last epoch's end."""
    marks: dict[str, float] = {}
    model.add_callback("on_train_start", lambda t: marks.setdefault("start", time.perf_counter()))
    model.add_callback("on_fit_epoch_end", lambda t: marks.setdefault(f"epoch{t.epoch}", time.perf_counter()))
    start = time.perf_counter()
    model.train(data=str(data), epochs=spec["epochs"], batch=spec["batch"], imgsz=spec["imgsz"],
                seed=spec["seed"], workers=spec["workers"], pretrained=False, plots=False, val=True,
                project=str(Path(spec["work"]) / "runs"), name="train", exist_ok=True)
    wall = time.perf_counter() - start
    mem, reserved = _peak_mem()
    last = marks.get(f"epoch{spec['epochs'] - 1}")
    return {"wall_s": wall, "peak_mem_gib": mem, "peak_reserved_gib": reserved,
            "epochs_s": last - marks["start"] if last and "start" in marks else None}


def _ultralytics_val(trainer: Any) -> dict[str, float]:
    """Ultralytics' own validation of best.pt (final_eval), e.g. metrics/mAP50-95(B) or metrics/accuracy_top1."""
    return {k: float(v) for k, v in (trainer.metrics or {}).items()}


def offline_ultralytics() -> None:
    """Ultralytics without downloads, logger integrations or settings outside YOLO_CONFIG_DIR."""
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as engine_trainer
    from ultralytics.utils import SETTINGS

    SETTINGS.update({k: False for k in ("sync", "hub", "clearml", "comet", "dvc", "mlflow", "neptune",
                                        "raytune", "tensorboard", "wandb")})
    # check_amp() compares the model against yolo11n.pt, downloading it first; on the CUDA GPUs
    # this benchmark runs on it passes, so AMP is on exactly as after a passing check.
    engine_trainer.check_amp = lambda model: next(model.parameters()).device.type == "cuda"
    # check_det_dataset() fetches Arial.ttf for plot labels; with plots=False no font is needed.
    data_utils.check_font = lambda *a, **k: None


def write_yolo_dataset(dataset: Any, root: Path, polygons: bool = False) -> Path:
    """train and valid in ultralytics' layout (images/<split> links, labels/<split>/*.txt with class
    cx cy w h normalized; class k is rtmdet's label k, i.e. dataset.category_ids[k]); the data yaml.
    polygons (the segment task): each row is the class and the instance's polygon, normalized."""
    import yaml

    for split in ("train", "valid"):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for rec in dataset.splits[split].records:
            stem = str(rec.image_id)  # unique within a split, unlike some exports' file names
            _link(rec.file, images / f"{stem}{rec.file.suffix.lower()}")
            rows = []
            for k, ((x1, y1, x2, y2), label) in enumerate(zip(rec.boxes.tolist(), rec.labels.tolist(), strict=True)):
                if polygons:
                    xy = yolo_polygon(rec.segmentations[k], rec.height, rec.width)
                    values = (xy / [rec.width, rec.height]).reshape(-1).tolist()
                else:
                    values = [(x1 + x2) / 2 / rec.width, (y1 + y2) / 2 / rec.height,
                              (x2 - x1) / rec.width, (y2 - y1) / rec.height]
                rows.append(f"{label} " + " ".join(f"{min(max(v, 0.0), 1.0):.6f}" for v in values))
            (labels / f"{stem}.txt").write_text("".join(r + "\n" for r in rows))
    data = {"path": str(root), "train": "images/train", "val": "images/valid",
            "names": dict(enumerate(dataset.classes))}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def yolo_polygon(segm: Any, height: int, width: int) -> Any:
    """One instance's outline as a single [N, 2] pixel polygon, which is all a YOLO label holds:
    a single polygon as it is; several parts (or an RLE's outlines) joined into one by
    ultralytics' merge_multi_segment, as its COCO converter does."""
    import numpy as np

    if isinstance(segm, dict):  # RLE: its outer contours, in pixels
        import cv2

        from rtmdet.data.masks import segmentation_to_mask

        mask = segmentation_to_mask(segm, height, width)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        segm = [c.reshape(-1).astype(np.float64).tolist() for c in contours if len(c) >= 3]
    if len(segm) == 1:
        return np.asarray(segm[0], np.float64).reshape(-1, 2)
    from ultralytics.data.converter import merge_multi_segment

    return np.concatenate(merge_multi_segment(segm), axis=0).astype(np.float64)


def _link(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def score_yolo(best: Path, dataset: Any, imgsz: int) -> dict[str, Any]:
    """YOLO's predictor on every valid image (rtmdet's reader, so both see the same pixels), scored
    by the function evaluate_detector scores with. A seg model's masks come at the original image
    size (retina_masks) and are scored as segm too."""
    import numpy as np
    from ultralytics import YOLO

    from rtmdet.data.masks import masks_to_rles
    from rtmdet.evaluation.coco_eval import score_detections
    from rtmdet.imageio import read_image
    from rtmdet.inference.detections import Detections

    model = YOLO(str(best))
    params = sum(p.numel() for p in model.model.parameters())  # before predict() fuses BN in place
    segment = model.task == "segment"
    records = dataset.splits["valid"].records
    dets: dict[int, Detections] = {}
    start = time.perf_counter()
    for i in range(0, len(records), 32):
        batch = records[i : i + 32]
        results = model.predict([read_image(r.file) for r in batch], imgsz=imgsz, conf=SCORE_THR, iou=NMS_IOU,
                                max_det=MAX_DETS, verbose=False, retina_masks=segment)
        for rec, res in zip(batch, results, strict=True):
            b = res.boxes
            masks = None
            if segment:
                hw = tuple(res.orig_shape)
                data = (res.masks.data.cpu().numpy() > 0.5) if res.masks is not None else np.zeros((0, *hw), bool)
                if data.shape[1:] != hw:
                    raise RuntimeError(f"YOLO masks of {data.shape[1:]} for an image of {hw}")
                masks = masks_to_rles(data)
            dets[int(rec.image_id)] = Detections(
                b.xyxy.cpu().numpy().astype(np.float32), b.conf.cpu().numpy().astype(np.float32),
                b.cls.cpu().numpy().astype(np.int64), list(dataset.classes), tuple(res.orig_shape), masks)
    seconds = time.perf_counter() - start
    ev = score_detections(dets, dataset.splits["valid"], dataset)
    return {**ev.stats, **_mask_stats(ev), "params": params, "eval_s": seconds, "per_class": ev.per_class}


def train_yolo_obb(spec: dict[str, Any]) -> dict[str, Any]:
    """YOLO11n-obb on an OBB label view of the DOTA records, then its best.pt scored on valid (else val)."""
    import ultralytics
    from ultralytics import YOLO

    from rtmdet.data.dota import load_dota

    offline_ultralytics()
    dataset = load_dota(spec["data"])
    data_yaml = write_yolo_obb_dataset(dataset, Path(spec["work"]) / "data")
    model = YOLO(YOLO_MODELS["rotate"])
    fit = fit_yolo(model, data_yaml, spec)
    trainer = model.trainer
    result = score_yolo_obb(Path(trainer.best), dataset, spec["imgsz"])
    if spec["keep"]:
        shutil.copy2(trainer.best, spec["keep"])
    n_train = len(dataset.splits["train"].records)
    return {"name": yolo_run_name(spec["imgsz"], "rotate"), "model": "YOLO11n-obb", "task": "rotate",
            **result, **fit, "images_per_s": spec["epochs"] * n_train / fit["wall_s"], "train_images": n_train,
            "ultralytics_val": _ultralytics_val(trainer), "amp": bool(trainer.amp),
            "ultralytics": ultralytics.__version__}


def write_yolo_obb_dataset(dataset: Any, root: Path) -> Path:
    """train and the validation split (valid, else val) in ultralytics' OBB layout: images/<split>
    links to the very files the records point at, labels/<split>/<stem>.txt with one row per object,
    `class x1 y1 x2 y2 x3 y3 x4 y4` (the corners of the record's rotated box, normalized by the image
    size and clipped to 0..1; an image without objects gets an empty file); the data yaml."""
    import yaml

    for split, source in (("train", dataset.splits["train"]), ("val", _val_split(dataset))):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for rec in source.records:
            stem = str(rec.image_id)  # unique within a split
            _link(rec.file, images / f"{stem}{rec.file.suffix.lower()}")
            rows = yolo_obb_rows(rec.rboxes, rec.labels, rec.width, rec.height)
            (labels / f"{stem}.txt").write_text("".join(r + "\n" for r in rows))
    data = {"path": str(root), "train": "images/train", "val": "images/val",
            "names": dict(enumerate(dataset.classes))}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def yolo_obb_rows(rboxes: Any, labels: Any, width: int, height: int) -> list[str]:
    """[K, 5] rotated boxes (cx, cy, w, h, angle) and [K] labels -> K YOLO OBB label rows,
    `class x1 y1 x2 y2 x3 y3 x4 y4`, corners normalized by width and height and clipped to 0..1."""
    import numpy as np
    import torch

    from rtmdet.geometry.rotated import rbox_to_corners

    rb = torch.as_tensor(np.asarray(rboxes, np.float64).reshape(-1, 5))
    corners = rbox_to_corners(rb).numpy() / [width, height]  # [K, 4, 2]
    corners = np.clip(corners, 0.0, 1.0).reshape(-1, 8)
    return [f"{int(label)} " + " ".join(f"{v:.6f}" for v in xy)
            for xy, label in zip(corners.tolist(), np.asarray(labels).tolist(), strict=True)]


def yolo_obb_detections(corners: Any, scores: Any, classes: Any) -> Any:
    """One YOLO OBB result (obb.xyxyxyxy [N, 4, 2] pixel corners, obb.conf [N], obb.cls [N]) as
    RotatedDetections: each quad's rotated box by quad_to_rbox, whatever angle range YOLO used."""
    import numpy as np

    from rtmdet.evaluation.rotated_map import RotatedDetections
    from rtmdet.geometry.rotated import quad_to_rbox

    quads = np.asarray(corners, np.float64).reshape(-1, 4, 2)
    rboxes = quad_to_rbox(quads)[0].astype(np.float64) if len(quads) else np.zeros((0, 5), np.float64)
    return RotatedDetections(rboxes, np.asarray(scores, np.float32).reshape(-1),
                             np.asarray(classes).reshape(-1).astype(np.int64))


def score_yolo_obb(best: Path, dataset: Any, imgsz: int) -> dict[str, Any]:
    """YOLO's OBB predictor on every valid (else val) image, read by rtmdet's reader, at the rotate
    task's score threshold, NMS IoU and detection cap; scored by score_rotated as RTMDet-R is."""
    from ultralytics import YOLO

    from rtmdet.evaluation.rotated_eval import score_rotated, truths_of
    from rtmdet.imageio import read_image

    model = YOLO(str(best))
    params = sum(p.numel() for p in model.model.parameters())  # before predict() fuses BN in place
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    if [str(names[k]) for k in sorted(names)] != list(dataset.classes):
        raise RuntimeError(f"YOLO classes {list(names.values())[:5]} are not the dataset's {dataset.classes[:5]}")
    split = _val_split(dataset)
    records = split.records
    dets = []
    start = time.perf_counter()
    for i in range(0, len(records), 16):
        batch = records[i : i + 16]
        results = model.predict([read_image(r.file) for r in batch], conf=ROT_SCORE_THR, iou=ROT_NMS_IOU,
                                max_det=ROT_MAX_DETS, imgsz=imgsz, verbose=False)
        for res in results:
            obb = res.obb
            dets.append(yolo_obb_detections(obb.xyxyxyxy.cpu().numpy(), obb.conf.cpu().numpy(),
                                            obb.cls.cpu().numpy()))
    seconds = time.perf_counter() - start
    ev = score_rotated(dets, truths_of(records), dataset.classes)
    return {**rotated_stats(ev), "params": params, "eval_s": seconds, "eval_split": split.name}


def train_yolo_classify(spec: dict[str, Any]) -> dict[str, Any]:
    """YOLO11n-cls on a linked view of the class folders, then its best.pt scored on val."""
    import ultralytics
    from ultralytics import YOLO

    from rtmdet.data.class_folders import load_class_folders

    offline_ultralytics()
    dataset = load_class_folders(spec["data"])
    view = write_yolo_cls_dataset(dataset, Path(spec["work"]) / "data")
    model = YOLO(YOLO_MODELS["classify"])
    fit = fit_yolo(model, view, spec)
    trainer = model.trainer
    result = score_yolo_classifier(Path(trainer.best), dataset, spec["imgsz"])
    if spec["keep"]:
        shutil.copy2(trainer.best, spec["keep"])
    n_train = len(dataset.splits["train"].images)
    return {"name": yolo_run_name(spec["imgsz"], "classify"), "model": "YOLO11n-cls", "task": "classify",
            **result, **fit, "images_per_s": spec["epochs"] * n_train / fit["wall_s"], "train_images": n_train,
            "ultralytics_val": _ultralytics_val(trainer), "amp": bool(trainer.amp),
            "ultralytics": ultralytics.__version__}


def write_yolo_cls_dataset(dataset: Any, root: Path) -> Path:
    """train/ and val/ in ultralytics' classify layout: <split>/<class>/<image> links to the images
    load_class_folders read (whatever the dataset calls its val folder; skipped images stay out).
    Every class gets a folder in both splits, so torchvision's ImageFolder indexes val's classes as
    train's; ultralytics' scan caches (<split>.cache) are written here, not into the dataset."""
    for split in ("train", "val"):
        folders = [root / split / name for name in dataset.classes]
        for folder in folders:
            folder.mkdir(parents=True)
        for k, im in enumerate(dataset.splits[split].images):
            _link(im.file, folders[im.label] / f"{k:06d}_{im.file.name}")  # unique even for nested folders
    return root


def yolo_class_order(names: Any, classes: list[str]) -> list[int]:
    """For each of the dataset's classes, the index of that class in a YOLO model's outputs
    (model.names: {index: name} or a list): probs[:, order] are in the dataset's class order."""
    index = {str(name): int(i) for i, name in (names.items() if isinstance(names, dict) else enumerate(names))}
    if sorted(index) != sorted(classes) or len(index) != len(classes):
        raise ValueError(f"YOLO classes {sorted(index)[:5]} are not the dataset's {sorted(classes)[:5]}")
    return [index[c] for c in classes]


def score_yolo_classifier(best: Path, dataset: Any, imgsz: int) -> dict[str, Any]:
    """YOLO's predictor (its own classify pre-process) on every val image, read by rtmdet's reader;
    its probabilities in the dataset's class order, scored by classification_result."""
    import numpy as np
    from ultralytics import YOLO

    from rtmdet.evaluation.classification import classification_result
    from rtmdet.imageio import read_image

    model = YOLO(str(best))
    params = sum(p.numel() for p in model.model.parameters())  # before predict() fuses BN in place
    order = yolo_class_order(model.names, dataset.classes)
    images = dataset.splits["val"].images
    scores = []
    start = time.perf_counter()
    for i in range(0, len(images), 32):
        batch = images[i : i + 32]
        results = model.predict([read_image(im.file) for im in batch], imgsz=imgsz, verbose=False)
        scores += [res.probs.data.float().cpu().numpy() for res in results]
    seconds = time.perf_counter() - start
    res = classification_result(np.stack(scores)[:, order], np.array([im.label for im in images]), dataset.classes)
    return {**classification_stats(res), "params": params, "eval_s": seconds}


if __name__ == "__main__":
    raise SystemExit(main())
