"""Atomic file writing: a killed stage never leaves a half-written file that DVC would cache."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rtmdet.failpoints import kill_point


def write_atomic(path: Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write bytes, text, or whatever a writer callback writes, to a temporary file beside
    `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
                kill_point(f"write:{path.name}")
            else:
                raw = data.encode("utf-8") if isinstance(data, str) else data
                f.write(raw[: len(raw) // 2])
                f.flush()
                kill_point(f"write:{path.name}")  # a kill here leaves half a temporary file
                f.write(raw[len(raw) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files a killed write_atomic left in `folder`; returns how many.

    Call it where one process owns the folder (a stage's output folder at its start): a
    preempted run that resumes again and again would otherwise pile up half-written copies."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj: Any) -> Any:
    """A copy with NaN/inf floats as None and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """JSON (NaN-free, UTF-8) written atomically."""
    text = json.dumps(json_safe(obj), indent=indent, ensure_ascii=False, allow_nan=False)
    write_atomic(path, text + "\n")
