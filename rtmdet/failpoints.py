"""Named kill points, so tests can preempt the pipeline at an exact place.

`RTMDET_KILL_AT=NAME` (or `NAME#N`: the N-th time this process reaches it) makes the process
SIGKILL its whole process group there, as a preempted machine would end `dvc repro` and the
stage it runs. Unset, a kill point costs one dictionary lookup. The points:

    write:<file name>   inside rtmdet.fileio.write_atomic, half the bytes in the temporary file
    train:step          after an optimizer step          train:epoch   after an epoch's checkpoint
    qat:step            after a QAT optimizer step       export:file   after each exported file
    verify:format       after each format is scored
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "RTMDET_KILL_AT"
_reached: Counter = Counter()  # per process: how often each point was reached


def armed(name: str) -> bool:
    """Whether RTMDET_KILL_AT names this point (a caller may finish pending writes before it)."""
    spec = os.environ.get(ENV)
    return bool(spec) and spec.partition("#")[0] == name


def kill_point(name: str) -> None:
    """SIGKILL this process group when RTMDET_KILL_AT names this point (and its count is due)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.killpg(os.getpgrp(), signal.SIGKILL)
