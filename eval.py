"""Test a checkpoint: ``python eval.py ckpt_path=PATH [data options]``; writes metrics.json.

The config lives in configs/eval.yaml; what runs is cifarkit.run.jobs.eval_job.
"""

from pathlib import Path

from cifarkit.run.cli import run
from cifarkit.run.jobs import eval_job

if __name__ == "__main__":
    run(eval_job, Path(__file__).resolve().parent / "configs", "eval")
