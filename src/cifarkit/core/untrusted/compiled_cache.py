"""Inductor's cache of compiled code: torch loads what it finds there, so it must be this user's alone."""

from __future__ import annotations

import getpass
import os
import re
import stat
import tempfile
from pathlib import Path


def _cache_dir() -> Path:
    """The folder inductor reads and writes, as inductor resolves it (older torch: as it did)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
        return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path(tempfile.gettempdir(), f"torchinductor_{user}"))
    return Path(cache_dir())


def inductor_cache_fault() -> str | None:
    """Why inductor's cache directory (``$TORCHINDUCTOR_CACHE_DIR``, else ``torchinductor_<user>`` in the
    temporary folder, which any local user could have made first) cannot be trusted, or None: it must
    be owned by this user and writable by no one else. One that does not exist yet is made by
    inductor for this user. Where the system has no user ids (Windows) there is nothing to check."""
    path = _cache_dir()
    if not hasattr(os, "getuid") or not path.exists():
        return None
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"inductor's cache {path} is not this user's alone (owner uid {st.st_uid}, {stat.filemode(st.st_mode)}); "
            "remove it or set TORCHINDUCTOR_CACHE_DIR to a folder of your own"
        )
    return None
