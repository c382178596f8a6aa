"""Bad input ends a run with one line that names the problem and the fix, not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (data, paths, config); its message says how to fix it."""
