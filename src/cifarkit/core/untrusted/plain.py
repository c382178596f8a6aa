"""Plain data from a file: nested data within bounds, a pydantic error as a phrase, a run folder's JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.text import shown

MAX_DEPTH = 12  # dicts and lists inside each other; train.py's deepest net config has 3
MAX_NODES = 100_000  # values in all; a shared sub-list pickled once counts each time it is reached


def check_tree(data: Any, where: str, fix: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Refuse nested data deeper than ``max_depth`` or larger than ``max_nodes`` in one line,
    walking it without recursion (a pickle can nest 100,000 deep, or reach one list a million
    times through shared references)."""
    stack, nodes = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        nested = isinstance(node, (dict, list, tuple))
        if nodes > max_nodes or (nested and depth >= max_depth):
            what = f"holds over {max_nodes} values" if nodes > max_nodes else f"is nested over {max_depth} levels deep"
            raise UserError(f"{where} {what}; {fix}")
        if nested:
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def invalid(e: ValidationError) -> str:
    """A pydantic error as a short phrase: where in the data, and what is wrong there."""
    first = e.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the value"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return shown(f"{where}: {first['msg']}{more}")[:300]


def inside(path: Any, folder: Path) -> bool:
    """Whether ``path`` (a string from a file) names a ``.ckpt`` file inside ``folder`` once every
    link and ``..`` is resolved."""
    if not isinstance(path, str) or not path.endswith(".ckpt"):
        return False
    resolved = Path(path).resolve()
    return resolved.parent == folder.resolve() and resolved.is_file()


MAX_FILE_BYTES = 16_000_000  # a run folder's JSON or YAML file: train.py's are a few kB


def _small_text(path: Path) -> str | None:
    """The file's text when it exists and is no larger than ``MAX_FILE_BYTES``; else None."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A run folder's JSON file (metrics.json, budget.json, a cache's statistics) when it holds an object;
    None when it is missing, over ``MAX_FILE_BYTES``, cut short, not JSON, or not an object: the folder is
    read as untrusted too."""
    text = _small_text(path)
    try:
        data = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_yaml(path: Path) -> Any | None:
    """A YAML file of a run folder (Hydra's ``.hydra/config.yaml``, ``overrides.yaml``) as OmegaConf reads
    it; None when missing, over ``MAX_FILE_BYTES``, not YAML, or using aliases (Hydra writes none, and an
    alias of an alias grows exponentially once OmegaConf copies it)."""
    import yaml
    from omegaconf import OmegaConf

    text = _small_text(path)
    if text is None:
        return None
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            return None
        return OmegaConf.create(text)
    except Exception:  # noqa: BLE001  YAML's and OmegaConf's errors on a file edited by hand
        return None
