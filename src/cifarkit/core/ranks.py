"""Which process of a run this is, asked without importing Lightning.

predict.py on an ``.onnx`` model must run where Lightning is not installed, so nothing here
imports it: where Lightning was never imported, none of its exceptions can have been raised
and no strategy has set the rank.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def from_lightning(module: str, name: str) -> tuple[Any, ...]:
    """``(module.name,)`` from Lightning, or ``()`` if Lightning was never imported."""
    if sys.modules.get("lightning") is None:
        return ()
    return (getattr(importlib.import_module(module), name),)


def global_zero() -> bool:
    """Whether this process is the run's global rank 0: not if Lightning's strategy gave it another
    rank, nor if the launcher's environment says so (torchrun's RANK, SLURM's SLURM_PROCID, a node
    rank or a local rank), read by the rules of Lightning's cluster environments."""
    rank_zero_only = from_lightning("lightning.pytorch.utilities", "rank_zero_only")
    if rank_zero_only and rank_zero_only[0].rank != 0:
        return False
    keys = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")
    return all(int(os.environ.get(key) or 0) == 0 for key in keys)
