"""Test a checkpoint: ``python eval.py ckpt_path=PATH [data options]``; writes metrics.json.

The config lives in configs/eval.yaml; what runs is cifarkit.train.evaluate.
"""

from pathlib import Path

from cifarkit.cli import run
from cifarkit.train import evaluate

if __name__ == "__main__":
    run(evaluate, Path(__file__).resolve().parent / "configs", "eval")
