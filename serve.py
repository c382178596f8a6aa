"""Serve a trained model over HTTP: ``python serve.py ckpt_path=CKPT [port=8000] [host=127.0.0.1]``.

The config lives in configs/serve.yaml; what runs is cifarkit.infer.serve.serve. It needs the serve
extra (LitServe): ``pip install -e ".[serve]"``.
"""

import sys
from pathlib import Path

from cifarkit.core.errors import UserError
from cifarkit.core.extras import require

try:
    require("serve.py", "serve", "litserve")  # checked before the serving code loads it
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None

from cifarkit.infer.serve import serve
from cifarkit.run.cli import run

if __name__ == "__main__":
    run(serve, Path(__file__).resolve().parent / "configs", "serve")
