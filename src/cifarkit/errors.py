"""Bad input ends a run with one line that names the problem and the fix, not a traceback.

Lightning-free, so that cifarkit/cli.py catches these without loading the training stack.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (data, paths, config); its message says how to fix it."""


class RunInUse(UserError):
    """Another live process trains in the run directory: this command writes nothing there."""


class TrainingStopped(Exception):
    """Raised to end fit() early; cli.guarded turns it into one line and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
