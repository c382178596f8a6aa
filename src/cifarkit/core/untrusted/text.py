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
    """JSON that every parser reads: ASCII, every string valid Unicode (a lone surrogate, what an undecodable
    byte of a file name becomes, is written as its escape ``\\udcff`` as ``shown`` writes it, where a strict
    reader refuses ``"\\udcff"``); NaN or infinity raise ``ValueError`` rather than be written."""
    return json.dumps(_valid_unicode(data), allow_nan=False)


def _valid_unicode(data: Any) -> Any:
    """``data`` (an answer this process built: shallow) with every string encodable as UTF-8."""
    if isinstance(data, str):
        return data.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(data, dict):
        return {_valid_unicode(k): _valid_unicode(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_valid_unicode(v) for v in data]
    return data
