"""`python -m rtmdet.export.install`: the one install step pip cannot express as an extra.

onnx2tf 2.x declares Requires-Python >= 3.12, yet runs on 3.11, and it pins opencv-python
(the GUI build, which needs libGL) while rtmdet uses opencv-python-headless. So the `export`
extra installs onnx2tf's real dependencies with their tested pins, and this step adds
onnx2tf itself without its metadata: `pip install --no-deps --ignore-requires-python`.

With --strict it also satisfies onnx2tf's leftover metadata pins (opencv-python, tqdm,
pytest, setuptools) and then puts the headless cv2 back on top, so `pip check` is clean.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import subprocess
import sys

ONNX2TF = "onnx2tf==2.6.9"
# onnx2tf 2.6.9's own pins that the `export` extra leaves out on purpose (see module doc).
STRICT_PINS = ("opencv-python==4.13.0.92", "tqdm==4.67.1", "pytest==9.0.2", "setuptools==81.0.0")


def pip(*args: str) -> None:
    """Run this interpreter's pip; raise SystemExit with pip's code when it fails."""
    cmd = [sys.executable, "-m", "pip", "install", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    code = subprocess.call(cmd)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtmdet.export.install", description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="also make `pip check` clean: pins opencv-python, "
                        "tqdm, pytest and setuptools as onnx2tf does, then restores the headless cv2")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("tensorflow") is None:
        print("TensorFlow is missing: first run  pip install 'rtmdet[export]'", file=sys.stderr)
        return 2
    pip("--no-deps", "--ignore-requires-python", ONNX2TF)
    if args.strict:
        pip("--no-deps", *STRICT_PINS)
        # Both OpenCV wheels own the cv2 folder; the last one installed wins it, and rtmdet
        # wants the headless build (the GUI build needs libGL and X libraries).
        headless = importlib.metadata.version("opencv-python-headless")
        pip("--no-deps", "--force-reinstall", f"opencv-python-headless=={headless}")
    print("onnx2tf installed: `rtmdet export --format tflite` is ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
