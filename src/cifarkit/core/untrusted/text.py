"""What goes out: names that came from a file made safe for a terminal or a log line, and strict JSON."""

from __future__ import annotations

import json
from typing import Any


def shown(text: Any) -> str:
    """``text`` with every character a terminal would act on (escape sequences, newlines, tabs,
    NUL, bidi overrides, undecodable bytes of a file name) written as a Python escape instead."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in s)


def to_json(data: Any) -> str:
    """JSON that every parser reads: NaN or infinity raise ``ValueError`` rather than be written."""
    return json.dumps(data, allow_nan=False)
