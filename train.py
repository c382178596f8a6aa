"""Train the CIFAR-10 classifier: ``python train.py [group=option] [key=value] [-m sweep]``.

The config lives in configs/train.yaml; what runs is cifarkit.run.train.train.
"""

from pathlib import Path

from cifarkit.run.cli import run
from cifarkit.run.train import train

if __name__ == "__main__":
    run(train, Path(__file__).resolve().parent / "configs", "train")
