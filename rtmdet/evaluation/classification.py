"""Classifier metrics: top-1 / top-5 accuracy, per-class precision, recall and F1, the confusion
matrix (and its figure), and the images the model got most confidently wrong.

mmpretrain's Accuracy reports top-k as the share of images whose label is among the k highest
scores (ties broken by index); precision/recall/F1 per class follow its SingleLabelMetric
(macro means over classes; a class never predicted has precision 0, as there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class ClassificationResult:
    """Scores of a labelled split."""

    classes: list[str]
    top1: float
    top5: float | None  # None with fewer than 5 classes
    per_class: list[dict]  # name, precision, recall, f1, support
    confusion: np.ndarray  # [C, C] counts: rows ground truth, columns prediction

    def metrics(self) -> dict:
        """Flat, stable metric names (top1, top5, precision, recall, f1, and per class)."""
        out = {"top1": self.top1, "top5": self.top5}
        for key in ("precision", "recall", "f1"):
            out[key] = float(np.mean([row[key] for row in self.per_class]))
        for row in self.per_class:
            out[f"recall/{row['name']}"] = row["recall"]
        return out


def classification_result(scores: np.ndarray, labels: np.ndarray, classes: list[str]) -> ClassificationResult:
    """Scores [N, C] (logits or probabilities) and labels [N] -> the split's result."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.int64)
    n, c = scores.shape
    if c != len(classes) or labels.shape != (n,):
        raise ValueError(f"scores {scores.shape} do not fit {len(classes)} classes and {labels.shape} labels")
    if n == 0:
        raise ValueError("no images to score")
    order = np.argsort(-scores, axis=1, kind="stable")
    hit = order == labels[:, None]
    top1 = float(hit[:, :1].any(1).mean())
    top5 = float(hit[:, :5].any(1).mean()) if c >= 5 else None
    pred = order[:, 0]
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    rows = []
    for k, name in enumerate(classes):
        tp = confusion[k, k]
        predicted, actual = confusion[:, k].sum(), confusion[k, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"name": name, "precision": float(precision), "recall": float(recall), "f1": float(f1),
                     "support": int(actual)})
    return ClassificationResult(list(classes), top1, top5, rows, confusion)


def worst_images(scores: np.ndarray, labels: np.ndarray, count: int = 16) -> list[int]:
    """Indices of the wrong images, most confident first (the predicted class's softmax)."""
    scores = np.asarray(scores, np.float64)
    z = np.exp(scores - scores.max(1, keepdims=True))
    prob = z / z.sum(1, keepdims=True)
    pred = prob.argmax(1)
    wrong = np.flatnonzero(pred != np.asarray(labels))
    return wrong[np.argsort(-prob[wrong, pred[wrong]], kind="stable")][:count].tolist()


def confusion_figure(result: ClassificationResult, title: str = "") -> Figure:
    """Row-normalized confusion heatmap (counts in the cells when the classes are few)."""
    from matplotlib.figure import Figure

    m = result.confusion
    n = len(result.classes)
    rows = m.sum(1, keepdims=True).astype(np.float64)
    frac = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    side = float(np.clip(0.5 * n + 3.0, 5.0, 18.0))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.75, label="fraction of the row")
    font = 7 if n > 30 else 9
    ax.set_xticks(range(n), result.classes, rotation=90 if n > 20 else 45, ha="right", rotation_mode="anchor",
                  fontsize=font)
    ax.set_yticks(range(n), result.classes, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=font,
                        color="white" if frac[i, j] > 0.55 else "black")
    ax.set_title(title or f"top-1 {result.top1:.3f}" + ("" if result.top5 is None else f", top-5 {result.top5:.3f}"))
    return fig
