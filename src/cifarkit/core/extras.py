"""The optional extras: a door whose package is missing says in one line which extra installs it.

The base install trains; each other door (a search, ONNX, serving, timm, a tracker, SLURM, SVHN)
imports its packages through ``require`` when it opens, so a missing one stops the command with
``<door> needs the <extra> extra: pip install -e ".[<extra>]"`` instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cifarkit.core.errors import UserError


def require(door: str, extra: str, *modules: str) -> ModuleType:
    """Import ``modules`` (the first is returned), or stop in one line naming the extra that installs them.

    A module that is installed but fails to import for another reason (a missing library of its
    own) keeps that reason in the line: reinstalling the extra may not be the fix.
    """
    line = f'{door} needs the {extra} extra: pip install -e ".[{extra}]"'
    imported = []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except ImportError as e:
            absent = e.name is not None and e.name.split(".")[0] == name.split(".")[0]  # the package itself
            raise UserError(line if absent else f"{line} (import {name} failed: {str(e).splitlines()[0]})") from e
    return imported[0]
