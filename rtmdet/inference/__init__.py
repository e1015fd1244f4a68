"""One inference path for every backend: letterbox pre-process, shared post-process.

Exports are resolved lazily so that light commands (check-data) do not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "Detections": "rtmdet.inference.detections",
    "Detector": "rtmdet.inference.predictor",
    "GpuPipeline": "rtmdet.inference.gpu",
    "PostprocessConfig": "rtmdet.inference.postprocess",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rtmdet.inference' has no attribute {name!r}")
