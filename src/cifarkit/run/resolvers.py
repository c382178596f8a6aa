"""The configs' own resolvers, registered by every entry point before Hydra composes a config.

* ``${lr_for_batch:1.5,${data.batch_size}}``: a learning rate quoted per 1024 images, at the batch size.
* ``${study_seed:...}``: the Optuna sampler's seed (cifarkit/run/sweep.py, configs/hparams_search).
* ``${checkpoint_dir:${paths.output_dir}}`` and ``${checkpoint_name:last}``: the run directory's
  checkpoints/ and a checkpoint's name in it, as cifarkit/core/rundir.py lays them out.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from cifarkit.core import rundir
from cifarkit.run.sweep import study_seed


def lr_for_batch(lr_per_1024: float, batch_size: int) -> float:
    """A learning rate quoted per 1024 images, at ``batch_size``: the linear scaling rule, so a
    preset's lr follows ``data.batch_size`` (``${lr_for_batch:1.5,${data.batch_size}}``)."""
    return lr_per_1024 * batch_size / 1024


def checkpoint_name(which: str) -> str:
    """A checkpoint's file name without ``.ckpt``, as Lightning's ``ModelCheckpoint(filename=...)`` takes it."""
    return Path(getattr(rundir, which.upper())).stem


def checkpoint_dir(run_dir: str | None) -> str | None:
    """The run directory's checkpoints/; None before Hydra made the directory (``--cfg job --resolve``)."""
    return None if run_dir is None else str(rundir.checkpoint_dir(run_dir))


def register_resolvers() -> None:
    """The configs' own resolvers (the module's docstring lists them)."""
    OmegaConf.register_new_resolver("lr_for_batch", lr_for_batch, replace=True)
    OmegaConf.register_new_resolver("study_seed", study_seed, replace=True)
    OmegaConf.register_new_resolver("checkpoint_dir", checkpoint_dir, replace=True)
    OmegaConf.register_new_resolver("checkpoint_name", checkpoint_name, replace=True)
