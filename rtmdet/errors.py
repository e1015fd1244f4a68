"""Project exceptions: one sentence naming the file, the item and the problem.

The CLI prints these without a traceback and exits non-zero.
"""


class RTMDetError(Exception):
    """Base class for every error rtmdet reports to a user."""


class ConfigError(RTMDetError):
    """A bad model size, activation, parameter or params.yaml key."""


class CheckpointError(RTMDetError):
    """A missing, corrupt or incompatible checkpoint file."""


class DataError(RTMDetError):
    """A dataset, annotation file or image that cannot be used."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message cut to its first line (libraries add tracebacks, hints, C++
    locations), or its type name when it has none: for one-line errors and warnings."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
