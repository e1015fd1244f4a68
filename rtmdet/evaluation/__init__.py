"""COCO evaluation of detectors: pycocotools' bbox stats under flat names, per-class AP."""

from rtmdet.evaluation.coco_eval import (
    STAT_NAMES,
    CocoScorer,
    EvalResult,
    coco_gt_from_split,
    detections_to_coco_results,
    evaluate_detector,
    evaluate_results,
    format_coco_table,
)

__all__ = [
    "STAT_NAMES",
    "CocoScorer",
    "EvalResult",
    "coco_gt_from_split",
    "detections_to_coco_results",
    "evaluate_detector",
    "evaluate_results",
    "format_coco_table",
]
