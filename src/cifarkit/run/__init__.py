"""A run: the entry points' shell, the plan, the run directory, the time budget, train and evaluate."""
