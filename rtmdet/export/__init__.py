"""Export to ONNX, TFLite and AOTInductor, and run the exported files through the shared `Detector`.

Light at import: torch, ONNX Runtime and TensorFlow load only when a function that needs them
runs, so `rtmdet --help` stays fast and a missing optional package gives a clear error.

    export_onnx(model, path)                        rtmdet.export.onnx
    export_tflite(model, out_dir, precisions, ...)  rtmdet.export.tflite
    export_aoti(model, path)                        rtmdet.export.aoti (AOTInductor .pt2)
    detector_from_export(path)                      rtmdet.export.backends
    export_classifier_onnx / _tflite, score_classifier_export   rtmdet.export.classify
    rotated_from_export(path), rotated_from_checkpoint(path)    rtmdet.export.rotated (RTMDet-R)
"""

from importlib import import_module

from rtmdet.errors import RTMDetError


class ExportError(RTMDetError):
    """An export that cannot run or whose result does not agree with torch."""


_EXPORTS = {
    "export_onnx": "rtmdet.export.onnx",
    "export_checkpoint": "rtmdet.export.command",
    "export_tflite": "rtmdet.export.tflite",
    "export_aoti": "rtmdet.export.aoti",
    "OnnxRuntimeBackend": "rtmdet.export.backends",
    "TFLiteBackend": "rtmdet.export.backends",
    "detector_from_export": "rtmdet.export.backends",
    "ExportMeta": "rtmdet.export.sidecar",
    "export_classifier_onnx": "rtmdet.export.classify",
    "export_classifier_tflite": "rtmdet.export.classify",
    "score_classifier_export": "rtmdet.export.classify",
    "read_meta": "rtmdet.export.sidecar",
    "rotated_from_export": "rtmdet.export.rotated",
    "rotated_from_checkpoint": "rtmdet.export.rotated",
}
__all__ = ["ExportError", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rtmdet.export' has no attribute {name!r}")
