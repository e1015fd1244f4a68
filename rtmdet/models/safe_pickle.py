"""A pickle module for torch.load that reads mmengine/mmdetection checkpoints without mmengine.

Official checkpoints may carry mmengine objects (HistoryBuffer in `message_hub`, numpy scalars),
so `torch.load(weights_only=True)` refuses them. Rather than unpickling arbitrary code, this
Unpickler allows tensors, containers and numpy arrays and turns every other class into an inert
placeholder that swallows its arguments and state.
"""

from __future__ import annotations

import pickle
from typing import Any

_SAFE_BUILTINS = {
    "set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "str", "bytes",
    "bytearray", "bool", "slice", "range", "object",
}
_ALLOWED_PREFIXES = ("torch._utils", "torch.storage", "torch.serialization", "collections", "numpy")


class Opaque:
    """Stand-in for a class we do not load (e.g. mmengine's HistoryBuffer)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> "Opaque":
        return Opaque(*args)


def _opaque_factory(*args: Any, **kwargs: Any) -> Opaque:
    return Opaque(*args)


class Unpickler(pickle.Unpickler):
    """Unpickler that only materializes tensors, containers and numpy data."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins":
            if name in _SAFE_BUILTINS:
                return super().find_class(module, name)
            return _opaque_factory
        if module == "torch" and not name.startswith("_"):
            obj = super().find_class(module, name)
            # dtypes, torch.Size and storage classes only; no functions.
            if isinstance(obj, type) or obj.__class__.__name__ == "dtype":
                return obj
            return _opaque_factory
        if module.startswith(_ALLOWED_PREFIXES) and not module.startswith("numpy.lib.npyio"):
            return super().find_class(module, name)
        return Opaque


# torch.load wants a module-like object with Unpickler and load.
load = pickle.load
loads = pickle.loads
