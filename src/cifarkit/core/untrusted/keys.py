"""serve.py's API key, from an environment variable or a file: the one secret the project reads."""

from __future__ import annotations

import os
from pathlib import Path

from cifarkit.core.errors import UserError, existing

ENV = "CIFARKIT_API_KEY"
MIN_CHARS, MAX_CHARS = 16, 256
FIX = f"use one line of {MIN_CHARS} to {MAX_CHARS} printable ASCII characters, no spaces (`openssl rand -hex 32`)"


def read_api_key(path: str | None) -> str | None:
    """The key from ``$CIFARKIT_API_KEY`` or the file ``path`` (not both), checked so that it can travel in a header;
    None when neither is set."""
    from_env = os.environ.get(ENV)
    if from_env is not None and path is not None:
        raise UserError(f"both ${ENV} and api_key_file={path} are set; keep one")
    if path is not None:
        file = existing("api_key_file", path, "a file holding the key")
        if file.stat().st_size > MAX_CHARS + 2:
            raise UserError(f"api_key_file={path} is over {MAX_CHARS} characters; {FIX}")
        key, where = (
            Path(file).read_bytes().decode("ascii", "replace").removesuffix("\n").removesuffix("\r"),
            (f"api_key_file={path}"),
        )
    elif from_env is not None:
        key, where = from_env, f"${ENV}"
    else:
        return None
    if not (MIN_CHARS <= len(key) <= MAX_CHARS and key.isascii() and key.isprintable() and " " not in key):
        raise UserError(f"the key in {where} is not {MIN_CHARS} to {MAX_CHARS} printable ASCII characters; {FIX}")
    return key
