"""The `rtmdet` command. Sub-commands live beside the code they drive; errors print one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from rtmdet import __version__
from rtmdet.errors import RTMDetError

# Each module provides add_parser(subparsers) and run(args) -> int.
COMMANDS = (
    "rtmdet.inference.predict",
    "rtmdet.data.check",
    "rtmdet.data.show",
    "rtmdet.data.crops",
    "rtmdet.evaluation.command",
    "rtmdet.training.command",
    "rtmdet.export.command",
    "rtmdet.reporting.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtmdet", description="RTMDet object detection in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"rtmdet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RTMDetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and cut: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's advice: no error at exit
        return 141


def run_stage(func, *args, **kwargs) -> None:
    """Entry point of a DVC stage script: logging on, one-line errors, non-zero exit on failure."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        func(*args, **kwargs)
    except RTMDetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
