"""Export a checkpoint: ``python export.py ckpt_path=CKPT [format=onnx|pt2] [output=PATH]``.

The config lives in configs/export.yaml; what runs is cifarkit.export.export.
"""

from pathlib import Path

from cifarkit.cli import run
from cifarkit.export import export

if __name__ == "__main__":
    run(export, Path(__file__).resolve().parent / "configs", "export")
