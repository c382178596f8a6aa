"""Checkpoint IO: a checkpoint is never half-written, and a resumed run keeps its best one.

* ``AtomicCheckpointIO``: every checkpoint is written atomically and read back safely (Lightning's plugin).
* ``CarryCheckpoints``: a run resumed into a new folder keeps the old run's best checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifarkit.core.files import atomic_write
from cifarkit.core.untrusted import inside
from cifarkit.core.untrusted.tensors import read_torch_file
from cifarkit.nets.saved import read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin, writing through ``atomic_write`` and reading through
    ``read_checkpoint``.

    Lightning's own ``TorchCheckpointIO`` also writes through a temporary file (fsspec's
    transaction), but that file sits in the system's temp folder, so the final move is a copy,
    not an atomic rename, when the run directory is on another disk; nothing is fsynced; and it
    loads with ``torch.load`` as the caller asks. Here the temporary file sits beside the
    checkpoint and is fsynced before the rename: a run killed mid-save keeps the previous
    ``last.ckpt`` intact (at worst a hidden ``.last.ckpt.*.tmp`` after a SIGKILL); and a resumed
    or tested checkpoint is loaded with ``weights_only`` (no pickled code runs), a bad file
    ending the run in one line.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if Path(path).name == SPAWN_WEIGHTS:  # rank 0's module weights, a bare state dict, through the same reader
            return read_torch_file(Path(path), f"Lightning's {SPAWN_WEIGHTS}", "train again", "checkpoint")
        return read_checkpoint(path)


# Lightning's spawn launcher hands rank 0's weights back to the main process in this file (a temporary folder).
SPAWN_WEIGHTS = ".temp.ckpt"


class CarryCheckpoints(L.Callback):
    """Resuming into a new run folder keeps ``ModelCheckpoint``'s best and top-k.

    ``ckpt_path=<old run>/checkpoints/last.ckpt`` starts a new run folder, and Lightning's
    ``ModelCheckpoint`` forgets its scores when its folder changes: the resumed run would
    then pick its best among the new epochs only and test other weights than a run that was
    never stopped. The kept checkpoints are linked (or copied) into the new folder and the
    saved state is pointed at them before ``ModelCheckpoint`` loads it.
    """

    in_budget_probe = False  # it writes the run's files rather than train: cifarkit/run/budget.py's probe leaves it out

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks", {})
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key)
            if not state or not cb.dirpath or state.get("dirpath") in (None, cb.dirpath):
                continue
            new = Path(cb.dirpath)
            # Only checkpoints beside the one resumed from are carried: the paths are the file's word.
            home = Path(trainer.ckpt_path).resolve().parent if trainer.ckpt_path else None
            state["best_k_models"] = {
                p: v for p, v in state.get("best_k_models", {}).items() if home and inside(p, home)
            }
            if trainer.is_global_zero:
                new.mkdir(parents=True, exist_ok=True)
                for old in state["best_k_models"]:
                    _link_or_copy(Path(old), new / Path(old).name)
            trainer.strategy.barrier("CarryCheckpoints")

            def moved(p: str, new: Path = new) -> str:
                return str(new / Path(p).name) if p else p

            kept = {moved(p): v for p, v in state.get("best_k_models", {}).items()}
            state["best_k_models"] = {p: v for p, v in kept.items() if Path(p).is_file()}
            for key in ("best_model_path", "kth_best_model_path"):  # empty where the old file is gone
                path = moved(state.get(key, ""))
                state[key] = path if path in state["best_k_models"] else ""
            state["last_model_path"] = moved(state.get("last_model_path", ""))
            state["dirpath"] = cb.dirpath


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() or not src.is_file():
        return
    try:
        os.link(src, dst)  # no extra disk; ModelCheckpoint deleting it later leaves the old run's file
    except OSError:
        shutil.copy2(src, dst)
