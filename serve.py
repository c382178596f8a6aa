"""Serve a trained model over HTTP: ``python serve.py ckpt_path=CKPT [port=8000] [host=127.0.0.1]``.

The config lives in configs/serve.yaml; what runs is cifarkit.infer.serve.serve. It needs the serve
extra (LitServe): ``pip install -e ".[serve]"``.
"""

import sys
from pathlib import Path

try:
    import litserve  # noqa: F401  the serve extra, checked before anything else is loaded
except ImportError:
    print('error: serve.py needs the serve extra: pip install -e ".[serve]"', file=sys.stderr)
    raise SystemExit(1) from None

from cifarkit.infer.serve import serve
from cifarkit.run.cli import run

if __name__ == "__main__":
    run(serve, Path(__file__).resolve().parent / "configs", "serve")
