"""Evaluation figures: PR curves, confusion matrix, per-class AP bars, worst-images grid.

Figures are built on `matplotlib.figure.Figure` directly (its own Agg canvas) rather than pyplot:
no global backend switch, no figure registry to leak, safe in threads and on headless machines.
`figure_png(fig)` turns one into PNG bytes; writing them to disk is the caller's business.
The image grid is drawn with OpenCV and returned as a BGR array.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from rtmdet.data.records import ImageRecord
from rtmdet.evaluation.coco_eval import EvalResult
from rtmdet.evaluation.confusion import ConfusionMatrix, ImageErrors
from rtmdet.imageio import read_image
from rtmdet.inference.detections import Detections
from rtmdet.visualize import class_color, draw_boxes, draw_masks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Above this many classes a per-class legend stops being readable: label only the mean and the
# best / worst few; above MAX_CELL_TEXT the confusion cells carry no numbers (colour only).
MAX_LEGEND = 20
MAX_CELL_TEXT = 30
_GAP = 8  # pixels between the images of the grid
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_CAPTION_LIMIT = 8  # more boxes than this on one side: outlines only, captions would hide the faces


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (tight bounding box, so long labels are never clipped)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    return buf.getvalue()


def image_png(image_bgr: np.ndarray, keep_colors: Sequence[tuple[int, int, int]] = (),
              colors: int | None = 256) -> bytes:  # fmt: skip
    """A BGR image as PNG bytes. With `colors`, quantized to a palette of that many colours
    (median cut, no dithering, which would double the size): a grid of photos shrinks about
    5x and looks nearly the same.
    `keep_colors` (BGR, e.g. the class colours) are put in the palette exactly, so a box drawn
    in a class colour keeps it; with too many of them the image is stored unquantized."""
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(image_bgr[:, :, ::-1]))
    keep = list(dict.fromkeys([(0, 0, 0), (255, 255, 255), *keep_colors]))
    if colors and len(keep) <= colors // 2:
        adaptive = pil.quantize(colors - len(keep), method=Image.Quantize.MEDIANCUT)
        palette = adaptive.getpalette()[: 3 * (colors - len(keep))]
        palette += [c for b, g, r in keep for c in (r, g, b)]
        target = Image.new("P", (1, 1))
        target.putpalette(palette)
        pil = pil.quantize(palette=target, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _rgb(label: int) -> tuple[float, float, float]:
    """The class colour of visualize.class_color (BGR 0-255) as matplotlib RGB 0-1."""
    b, g, r = class_color(label)
    return r / 255, g / 255, b / 255


def pr_curves_figure(result: EvalResult, title: str = "") -> Figure:
    """Two axes, IoU 0.50 and 0.50:0.95: a precision-recall line per class, its AP in the legend."""
    from matplotlib.figure import Figure

    present = sum(1 for r in result.per_class if not r["absent"])
    labelled = present if present <= MAX_LEGEND else 10  # see _pr_axes
    legend_rows = -(-(labelled + 1) // 2)
    # The legends sit under the axes: grow the figure with them so the layout never squeezes.
    fig = Figure(figsize=(11, 5.6 + 0.24 * legend_rows), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, iou, key, name in ((axes[0], 0.5, "AP50", "IoU 0.50"), (axes[1], None, "AP", "IoU 0.50:0.95")):
        _pr_axes(ax, result, iou, key)
        ax.set_title(f"{name}  (mean {key} {_fmt(result.stats['mAP50' if iou else 'mAP'])})")
    fig.suptitle(title or "Precision-recall per class", fontsize=13)
    return fig


def _pr_axes(ax, result: EvalResult, iou: float | None, key: str) -> None:
    curves = []
    for label, row in enumerate(result.per_class):
        pr = result.pr_curve(label, iou=iou)
        if pr is not None:
            curves.append((row[key] or 0.0, label, row["name"], pr))
    curves.sort(key=lambda c: -c[0])
    labelled, legend_title = {c[1] for c in curves}, f"class ({key})"
    if len(curves) > MAX_LEGEND:  # label the best and worst five only
        labelled = {c[1] for c in curves[:5] + curves[-5:]}
        legend_title = f"class ({key}): best 5 and worst 5 of {len(curves)}"
    for ap, label, name, (rec, prec) in curves:
        show = label in labelled
        ax.plot(rec, prec, color=_rgb(label), lw=1.6 if show else 0.8, alpha=1.0 if show else 0.35,
                label=f"{name} ({ap:.3f})" if show else None)  # fmt: skip
    if curves:
        mean = np.mean([c[3][1] for c in curves], axis=0)
        ax.plot(curves[0][3][0], mean, color="black", lw=2.4, ls="--",
                label=f"all classes ({np.mean([c[0] for c in curves]):.3f})")  # fmt: skip
    else:
        ax.text(0.5, 0.5, "no ground truth in this split", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.set_aspect("equal")
    if curves:
        # Below the axes: a legend inside would hide the curves it explains.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1 if len(labelled) < 5 else 2,
                  fontsize=9, title=legend_title, title_fontsize=9, frameon=False)  # fmt: skip


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def confusion_figure(cm: ConfusionMatrix, title: str = "") -> Figure:
    """Heatmaps of the confusion matrix: raw counts and row-normalized fractions side by side
    (normalized only, without cell numbers, when the classes are too many to read)."""
    from matplotlib.figure import Figure

    n = len(cm.labels)
    side = float(np.clip(0.55 * n + 2.5, 5.0, 18.0))
    both = n <= MAX_CELL_TEXT
    fig = Figure(figsize=(side * (2 if both else 1) + 1.5, side), layout="constrained")
    axes = fig.subplots(1, 2 if both else 1, squeeze=False)[0]
    if both:
        _heatmap(fig, axes[0], cm, cm.matrix.astype(np.float64), "counts", counts=True)
    _heatmap(fig, axes[-1], cm, cm.normalized(), "normalized: fraction of each row", counts=False)
    fig.suptitle(title or f"Confusion matrix at score >= {cm.score_thr:g}, IoU >= {cm.iou_thr:g}",
                 fontsize=13)  # fmt: skip
    return fig


def _heatmap(fig, ax, cm: ConfusionMatrix, values: np.ndarray, name: str, counts: bool) -> None:
    from matplotlib.colors import PowerNorm

    n = len(cm.labels)
    # Counts span orders of magnitude (a big diagonal, a few swaps); a square-root scale keeps
    # the small off-diagonal cells visible.
    norm = PowerNorm(0.5, vmin=0, vmax=max(1.0, values.max())) if counts else None
    im = ax.imshow(values, cmap="Blues", norm=norm, vmin=None if counts else 0, vmax=None if counts else 1)
    ticks = _sqrt_ticks(values.max()) if counts else None
    fig.colorbar(im, ax=ax, shrink=0.75, ticks=ticks, label="count" if counts else "fraction of the row")
    font = 7 if n > 30 else 8 if n > 12 else 10
    row_names = [*cm.classes, "background\n(false alarm)"]
    col_names = [*cm.classes, "background\n(missed)"]
    # Many narrow columns: vertical labels, since slanted ones would run into each other.
    rotation = 90 if n > MAX_CELL_TEXT else 45
    ax.set_xticks(range(n), col_names, rotation=rotation, ha="right", rotation_mode="anchor", fontsize=font)
    ax.set_yticks(range(n), row_names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.set_title(name)
    if n <= MAX_CELL_TEXT:
        top = values.max() if counts else 1.0
        for i in range(n):
            for j in range(n):
                if i == n - 1 and j == n - 1:
                    continue  # background/background: not a thing
                v = values[i, j]
                text = f"{int(v)}" if counts else f"{v:.2f}"
                dark = (np.sqrt(v / top) if counts and top > 0 else v) > 0.55
                ax.text(j, i, text, ha="center", va="center", fontsize=font,
                        color="white" if dark else "black")  # fmt: skip
    # Separate the background row / column from the class block.
    ax.axhline(n - 1.5, color="gray", lw=0.8)
    ax.axvline(n - 1.5, color="gray", lw=0.8)


def _sqrt_ticks(vmax: float) -> list[int]:
    """Whole-number ticks evenly spaced on a square-root colour scale, rounded to 2 digits."""
    out = {0}
    for k in range(1, 5):
        v = vmax * (k / 4) ** 2
        if v >= 1:
            digits = max(0, len(str(int(v))) - 2)
            out.add(int(round(v, -digits)))
    return sorted(out)


def per_class_ap_figure(result: EvalResult, title: str = "") -> Figure:
    """Horizontal bars per class, best at the top: AP50 (light) behind AP (dark), with values."""
    from matplotlib.figure import Figure

    rows = sorted(result.per_class, key=lambda r: (r["AP"] is None, -(r["AP"] or 0.0), r["name"]))
    n = max(1, len(rows))
    fig = Figure(figsize=(9, 1.6 + 0.38 * n), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ap = np.array([r["AP"] or 0.0 for r in rows])
    ap50 = np.array([r["AP50"] or 0.0 for r in rows])
    ax.barh(y, ap50, height=0.7, color="#9ecae1", label="AP50 (IoU 0.50)")
    ax.barh(y, ap, height=0.7, color="#2171b5", label="AP (IoU 0.50:0.95)")
    font = 7 if n > 40 else 9
    for i, r in enumerate(rows):
        text = "absent from split" if r["absent"] else f"{_fmt(r['AP'])} / {_fmt(r['AP50'])}"
        ax.text(max(ap50[i], 0) + 0.01, i, text, va="center", fontsize=font,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1, "alpha": 0.85})  # fmt: skip
    ax.set_yticks(y, [f"{r['name']} (n={r['num_gt']})" for r in rows], fontsize=font)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # best at the top, no empty margin
    ax.set_xlim(0, 1.18)  # room for the value text after a bar near 1.0
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("average precision  (bar text: AP / AP50)")
    ax.grid(axis="x", alpha=0.3)
    if result.stats["mAP"] is not None:
        ax.axvline(result.stats["mAP"], color="black", ls="--", lw=1, label=f"mAP {result.stats['mAP']:.3f}")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=9, frameon=False)
    ax.set_title(title or "AP per class", pad=28)
    return fig


def worst_images_grid(
    records: Sequence[ImageRecord], detections: dict[int, Detections], ranked: Sequence[ImageErrors],
    classes: Sequence[str], score_thr: float, num_images: int = 16, tile: int = 400, cols: int = 2,
    iou_thr: float = 0.5,
) -> np.ndarray:  # fmt: skip
    """A BGR image: for the first `num_images` of `ranked` (worst first), ground truth on the left
    and detections >= score_thr on the right, under a legend of class colours. Mistakes (missed or
    wrongly classified objects, false alarms) get a black-and-white dashed outline."""
    by_id = {int(r.image_id): r for r in records}
    pairs = [_pair_tile(i + 1, by_id[e.image_id], detections.get(e.image_id), e, classes, score_thr,
                        tile, iou_thr)
             for i, e in enumerate(ranked[:num_images])]  # fmt: skip
    cols = max(1, min(cols, len(pairs)))
    width = cols * (2 * tile + _GAP) + (cols - 1) * 2 * _GAP
    rows = [_legend(classes, score_thr, width)]
    for start in range(0, len(pairs), cols):
        row = pairs[start : start + cols]
        height = max(p.shape[0] for p in row)
        canvas = np.full((height + 2 * _GAP, width, 3), 255, np.uint8)
        for c, pair in enumerate(row):
            x = c * (2 * tile + 3 * _GAP)
            canvas[_GAP : _GAP + pair.shape[0], x : x + pair.shape[1]] = pair
        rows.append(canvas)
    if not pairs:
        rows.append(_text_strip("no images to show", width))
    return np.vstack(rows)


def _text_strip(text: str, width: int, height: int = 28, color=(0, 0, 0)) -> np.ndarray:
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (4, height - 9), _FONT, 0.5, color, 1, cv2.LINE_AA)
    return strip


def _legend(classes: Sequence[str], score_thr: float, width: int) -> np.ndarray:
    """What the grid shows (wrapped to the width), then a colour swatch per class."""
    note = (f"Worst images first: most misses + false alarms + wrong classes at score >= {score_thr:g}. "
            "Left: ground truth, right: predictions. Dashed outline: a mistake.")  # fmt: skip
    lines: list[str] = []
    for word in note.split():
        if lines and _text_width(f"{lines[-1]} {word}") <= width - 8:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    # Lay the swatches out first, so the strip is exactly as tall as its content.
    line_h, x, y, spots = 24, 4, len(lines) * 24, []
    for label, name in enumerate(classes):
        tw = _text_width(name)
        if x > 4 and x + 20 + tw > width - 4:
            x, y = 4, y + line_h
        spots.append((x, y, label, name))
        x += 20 + tw + 18
    strip = np.full((y + line_h + 4, width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(strip, line, (4, 17 + i * line_h), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for x, y, label, name in spots:
        cv2.rectangle(strip, (x, y + 6), (x + 16, y + 20), class_color(label), -1)
        cv2.putText(strip, name, (x + 20, y + 18), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, _FONT, 0.5, 1)[0][0]


def _pair_tile(
    rank: int, rec: ImageRecord, dets: Detections | None, err: ImageErrors, classes: Sequence[str],
    score_thr: float, tile: int, iou_thr: float,
) -> np.ndarray:  # fmt: skip
    """Header, then the image twice: ground truth left, detections >= score_thr right."""
    from rtmdet.evaluation.confusion import match_image

    image = read_image(rec.file)
    scale = tile / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if dets is None or len(dets) == 0:
        boxes, scores, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        keep = np.zeros(0, bool)
    else:
        keep = np.asarray(dets.scores) >= score_thr
        boxes, scores, labels = dets.boxes[keep], dets.scores[keep], dets.labels[keep]
    m = match_image(rec.boxes, rec.labels, boxes, scores, labels, iou_thr, rec.crowd_boxes)
    if rec.segmentations is not None:  # the segment task: masks tinted in their class colours
        from rtmdet.data.masks import rle_to_mask, segmentation_to_mask

        gt_masks = [segmentation_to_mask(s, rec.height, rec.width) for s in rec.segmentations]
        pred_masks = [] if dets is None or dets.masks is None else [
            rle_to_mask(r) for r, k in zip(dets.masks, keep) if k]
        small_gt, small_pred = draw_masks(small, gt_masks, rec.labels), draw_masks(small, pred_masks, labels)
    else:
        small_gt = small_pred = small
    gt_wrong = np.array([p < 0 or labels[p] != rec.labels[g] for g, p in enumerate(m.gt_to_pred)], bool)
    pred_wrong = np.array([(g < 0 and not ign) or (g >= 0 and rec.labels[g] != labels[p])
                           for p, (g, ign) in enumerate(zip(m.pred_to_gt, m.ignored))], bool)  # fmt: skip
    left = _draw(small_gt, rec.boxes * scale, rec.labels, classes, None, gt_wrong)
    right = _draw(small_pred, boxes * scale, labels, classes, scores, pred_wrong)
    header = 46
    pair = np.full((header + small.shape[0], 2 * tile + _GAP, 3), 255, np.uint8)
    pair[header:, : small.shape[1]] = left
    pair[header:, tile + _GAP : tile + _GAP + small.shape[1]] = right
    alarms = f"{err.false_alarms} false alarm" + ("" if err.false_alarms == 1 else "s")
    line1 = f"#{rank} {_shorten(rec.file.name, 34)}: {err.misses} missed, {alarms}, {err.swaps} wrong class"
    cv2.putText(pair, line1, (2, 17), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    grey = (80, 80, 80)
    cv2.putText(pair, f"ground truth ({err.num_gt})", (2, 39), _FONT, 0.5, grey, 1, cv2.LINE_AA)
    cv2.putText(pair, f"predictions >= {score_thr:g} ({len(labels)})", (tile + _GAP + 2, 39), _FONT, 0.5,
                grey, 1, cv2.LINE_AA)  # fmt: skip
    return pair


def _draw(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, classes: Sequence[str],
          scores: np.ndarray | None, wrong: np.ndarray) -> np.ndarray:  # fmt: skip
    """Boxes in class colours, captioned when few; mistakes outlined dashed on top."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) <= _CAPTION_LIMIT:
        out = draw_boxes(image, boxes, labels, classes, scores)
    else:
        out = image.copy()
        for box, label in zip(boxes, labels):
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            cv2.rectangle(out, (x1, y1), (x2, y2), class_color(int(label)), 1, cv2.LINE_AA)
    _dashed_boxes(out, boxes[wrong.astype(bool)] if len(boxes) else boxes)
    return out


def _shorten(text: str, limit: int) -> str:
    """Long file names (Roboflow adds a 32-digit hash) cut in the middle."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


def _dashed_boxes(image: np.ndarray, boxes: np.ndarray, dash: int = 5) -> None:
    """Black-and-white dashed outline just outside each box, visible on any colour or photo."""
    for x1, y1, x2, y2 in np.asarray(boxes).reshape(-1, 4):
        x1, y1, x2, y2 = int(x1) - 2, int(y1) - 2, int(x2) + 2, int(y2) + 2
        for a, b in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
            length = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
            for s in range(0, length, dash):
                t0, t1 = s / length, min(s + dash, length) / length
                p0 = (round(a[0] + (b[0] - a[0]) * t0), round(a[1] + (b[1] - a[1]) * t0))
                p1 = (round(a[0] + (b[0] - a[0]) * t1), round(a[1] + (b[1] - a[1]) * t1))
                color = (255, 255, 255) if (s // dash) % 2 else (0, 0, 0)
                cv2.line(image, p0, p1, color, 2, cv2.LINE_4)
