"""The files the report reads, relative to the reports folder, and tolerant readers for them.

Only metrics/evaluate.json is required; every other input may be missing (a stage not run yet,
an older experiment): its reader returns None and a one-line note for the page instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rtmdet.errors import DataError

log = logging.getLogger(__name__)

EVALUATE = Path("metrics/evaluate.json")  # {split: {mAP, mAP50, ..., AP/<class>, ...}}
VERIFY = Path("metrics/verify.json")  # {"split": .., "formats": {name: {mAP, mAP50, drop, size_mb, latency_ms}}}
QAT = Path("metrics/qat.json")  # {"fake_quant": {mAP, mAP50}, "float": {mAP, mAP50}}
EVALUATE_DIR = Path("evaluate")  # per_class_<split>.json and the evaluate PNGs
PREPARE_DIR = Path("prepare")  # dataset charts and stats.json
TEACHER = Path("train/teacher.json")  # the train stage's teacher/student summary ({} without a teacher)
LIVE_METRICS = Path("train/plots/metrics")  # dvclive's per-metric .tsv files
REPORT_DIR = Path("report")  # the PNGs this stage draws
# verify.json's formats in the order tables show them; any other name follows, sorted.
FORMATS = ("torch", "onnx", "tflite_fp32", "tflite_fp16", "tflite_int8", "qat_int8")


def format_order(names) -> list[str]:
    """Export format names, known ones in FORMATS order first."""
    return [f for f in FORMATS if f in names] + sorted(set(names) - set(FORMATS))


def parse_json(text: bytes | str, where: str) -> Any:
    """JSON from text; DataError naming `where` when it is not valid JSON."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None


def read_evaluate(reports: Path) -> dict[str, dict[str, Any]]:
    """The required evaluate metrics, {split: metrics}; DataError when missing or malformed."""
    path = Path(reports) / EVALUATE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the evaluate stage first") from None
    data = parse_json(text, str(path))
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: expected an object of splits, each an object of metrics")
    return data


def read_optional(path: Path, what: str) -> tuple[Any | None, str | None]:
    """(JSON, None) when `path` is readable, else (None, a one-line note saying why it is left out)."""
    try:
        return parse_json(Path(path).read_text(encoding="utf-8"), str(path)), None
    except FileNotFoundError:
        return None, f"No {what}: `{path}` does not exist."
    except (OSError, DataError) as exc:
        log.warning("%s left out of the report: %s", what, exc)
        return None, f"No {what}: {exc}."
