"""Test a checkpoint: ``python eval.py ckpt_path=PATH [data options]``; writes metrics.json.

The config lives in configs/eval.yaml; what runs is cifarkit.run.train.evaluate.
"""

from pathlib import Path

from cifarkit.run.cli import run
from cifarkit.run.train import evaluate

if __name__ == "__main__":
    run(evaluate, Path(__file__).resolve().parent / "configs", "eval")
