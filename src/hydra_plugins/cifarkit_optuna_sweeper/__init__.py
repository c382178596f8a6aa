"""cifarkit's Optuna sweeper for Hydra (``hydra/sweeper=optuna``): Optuna 4+ through its ask/tell
API, with pruning, and many sweep processes on one study. Hydra imports every module of the
``hydra_plugins`` namespace package when it starts, so these stay light: Optuna is imported
when a sweep starts (hydra_plugins/cifarkit_optuna_sweeper/study.py). docs/sweeps.md tells how to use it."""
