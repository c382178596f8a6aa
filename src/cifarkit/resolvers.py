"""The configs' own resolvers, registered by every entry point before Hydra composes a config.

* ``${lr_for_batch:1.5,${data.batch_size}}``: a learning rate quoted per 1024 images, at the batch size.
* ``${study_seed:...}``: the Optuna sampler's seed (cifarkit/sweep.py, configs/hparams_search).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from cifarkit.sweep import study_seed


def lr_for_batch(lr_per_1024: float, batch_size: int) -> float:
    """A learning rate quoted per 1024 images, at ``batch_size``: the linear scaling rule, so a
    preset's lr follows ``data.batch_size`` (``${lr_for_batch:1.5,${data.batch_size}}``)."""
    return lr_per_1024 * batch_size / 1024


def register_resolvers() -> None:
    """The configs' own resolvers: ``lr_for_batch``, and ``study_seed`` for the Optuna sampler
    (configs/hparams_search)."""
    OmegaConf.register_new_resolver("lr_for_batch", lr_for_batch, replace=True)
    OmegaConf.register_new_resolver("study_seed", study_seed, replace=True)
