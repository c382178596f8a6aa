"""Which process of a run this is, by Lightning's own rank utilities, loaded only where Lightning already is.

``import lightning`` loads the whole training stack, which predict.py and serve.py never need (and
predict.py on an ``.onnx`` model runs where it is not installed), so nothing here imports it first:
where Lightning was never imported, none of its exceptions can have been raised and this process is
no rank of a run.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def from_lightning(module: str, name: str) -> tuple[Any, ...]:
    """``(module.name,)`` from Lightning, or ``()`` if Lightning was never imported."""
    if sys.modules.get("lightning") is None:
        return ()
    return (getattr(importlib.import_module(module), name),)


def global_zero() -> bool:
    """Whether this process is the run's global rank 0, so that one process writes the run's files.

    Lightning's ``rank_zero_only.rank``: the rank its strategy set, before that the launcher's
    (RANK, LOCAL_RANK, SLURM_PROCID, JSM_NAMESPACE_RANK); and, as that rank is a node's local one
    until the strategy starts, the node rank (NODE_RANK, GROUP_RANK) of Lightning's environment.
    """
    if sys.modules.get("lightning") is None:
        return True
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0 and LightningEnvironment().node_rank() == 0
