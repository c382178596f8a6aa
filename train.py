"""Train the CIFAR-10 classifier: ``python train.py [group=option] [key=value] [-m sweep]``.

The config lives in configs/train.yaml; what runs is cifarkit.run.jobs.train_job.
"""

from pathlib import Path

from cifarkit.run.cli import run
from cifarkit.run.jobs import train_job

if __name__ == "__main__":
    run(train_job, Path(__file__).resolve().parent / "configs", "train")
