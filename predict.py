"""Classify image files: ``python predict.py ckpt_path=CKPT inputs=FILE_OR_FOLDER [format=json] [top_k=3]``.

The config lives in configs/predict.yaml; what runs is cifarkit.infer.predict.predict.
"""

from pathlib import Path

from cifarkit.infer.predict import predict
from cifarkit.run.cli import run

if __name__ == "__main__":
    run(predict, Path(__file__).resolve().parent / "configs", "predict")
