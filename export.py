"""Export a checkpoint: ``python export.py ckpt_path=CKPT [format=onnx|pt2] [output=PATH]``.

The config lives in configs/export.yaml; what runs is cifarkit.infer.export.export.
"""

from pathlib import Path

from cifarkit.infer.export import export
from cifarkit.run.cli import run

if __name__ == "__main__":
    run(export, Path(__file__).resolve().parent / "configs", "export")
