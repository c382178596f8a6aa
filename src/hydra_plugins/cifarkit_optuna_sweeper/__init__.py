"""cifarkit's Optuna sweeper for Hydra (``hydra/sweeper=optuna``): Optuna 4+ through its ask/tell
API, with pruning, and many sweep processes on one study. Hydra imports every module of the
``hydra_plugins`` namespace package when it starts, except those named with a leading underscore:
the search itself (_study.py) and its jobs' pruning callback (_pruning.py) are those, so Optuna and
Lightning load only when a sweep or a trial needs them. docs/sweeps.md tells how to use it."""
