"""Classify image files: ``python predict.py ckpt_path=CKPT inputs=FILE_OR_FOLDER [format=json] [top_k=3]``.

The config lives in configs/predict.yaml; what runs is cifarkit.predict.predict.
"""

from pathlib import Path

from cifarkit.cli import run
from cifarkit.predict import predict

if __name__ == "__main__":
    run(predict, Path(__file__).resolve().parent / "configs", "predict")
