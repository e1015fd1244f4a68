"""DVC stage `synthetic`: write the embedded default dataset (shapes) to data/synthetic."""

from pathlib import Path

from rtmdet.cli import run_stage
from rtmdet.config import load_params
from rtmdet.data.synthetic import make_synthetic_dataset


def main() -> None:
    data = load_params(sections=("data",))["data"]
    make_synthetic_dataset(Path("data/synthetic"), data.synthetic_seed,
                           train=data.synthetic_train, valid=data.synthetic_valid)


if __name__ == "__main__":
    run_stage(main)
