"""Reading a checkpoint a stranger may have made, and rebuilding its net without running its code.

A checkpoint is read once per entry point, always here:

* ``read_checkpoint``: ``torch.load(weights_only=True)`` (no pickled code runs), or one line.
* ``SavedNet.read``: what eval.py, predict.py and export.py need from it, checked: the net's
  config, its weights, the ``DataInfo`` it was trained with and the test-time options.
* ``build_net``: the one way a saved net config becomes a module. Every ``_target_`` must
  resolve to an ``nn.Module`` class *defined* in a trusted module (its ``__module__``, not the
  string's prefix), nested configs included; no other Hydra key, no interpolation. The whole
  config is judged before any class is called.

Writing them (atomically, with their ``data_info``) is cifarkit/checkpoint_io.py's ``AtomicCheckpointIO``
and ``ImageClassifier.on_save_checkpoint``. Lightning-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarkit import rundir
from cifarkit.augment import TTA
from cifarkit.errors import UserError
from cifarkit.images import DataInfo

PLAIN = (str, int, float, bool, type(None))


def checkpoint_file(path: str | Path) -> Path:
    """``path`` if it is a file, else the one line that says so (before any work starts)."""
    p = Path(path)
    if not p.is_file():
        example = f"<run>/{rundir.CHECKPOINTS}/{rundir.LAST}"
        raise UserError(f"ckpt_path={path} does not exist; pass the path of a .ckpt file (e.g. {example})")
    return p


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (no code runs: ``weights_only``) or stop with one clear line."""
    p = checkpoint_file(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"ckpt_path={path} is not a readable checkpoint ({e.__class__.__name__}); pass a .ckpt written by train.py") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by train.py")
    return ckpt


@dataclass(frozen=True)
class SavedNet:
    """A trained net as a checkpoint holds it, checked but not yet built."""

    path: Path
    data: DataInfo
    net_config: dict[str, Any]
    weights: dict[str, torch.Tensor]  # the net's own state dict
    label_smoothing: float
    channels_last: bool
    tta: str

    @classmethod
    def read(cls, path: str | Path) -> SavedNet:
        ckpt = read_checkpoint(path)
        where = f"ckpt_path={path}"
        hparams = ckpt.get("hyper_parameters")
        hparams = hparams if isinstance(hparams, dict) else {}
        net = hparams.get("net")
        if not isinstance(net, dict) or "_target_" not in net:
            raise UserError(f"{where} has no net config (hyper_parameters.net); pass a .ckpt written by train.py")
        smoothing = hparams.get("label_smoothing", 0.0)
        if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) or not 0 <= smoothing < 1:
            raise UserError(f"{where} has label_smoothing={smoothing!r}; pass a .ckpt written by train.py")
        tta = hparams.get("tta", "none")
        if tta not in TTA:
            raise UserError(f"{where} has tta={tta!r}; pass a .ckpt written by train.py")
        weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if isinstance(k, str) and k.startswith("net.")}
        return cls(Path(path), DataInfo.check(ckpt.get("data_info"), where), net, weights, float(smoothing),
                   hparams.get("channels_last", True) is True, tta)

    def rebuild(self, trusted: Sequence[str]) -> nn.Module:
        """The net with its trained weights (CPU, eval mode), built under the trust rules."""
        net = build_net(self.net_config, len(self.data.classes), trusted)
        try:
            net.load_state_dict(self.weights)
        except (RuntimeError, TypeError) as e:  # missing or odd-shaped weights
            raise UserError(f"ckpt_path={self.path}: its weights do not fit its net config ({str(e).splitlines()[0]}); "
                            "pass a .ckpt written by train.py") from e
        return net.eval()


# ---------------------------------------------------------------------------------------------
# Trusting a saved net config, and building it.


def _is_trusted(module: str, trusted: Sequence[str]) -> bool:
    return any(f"{module}.".startswith(t if t.endswith(".") else f"{t}.") for t in trusted)


def _refuse(where: str, what: str, trusted: Sequence[str]) -> UserError:
    return UserError(
        f"the checkpoint's {where} {what}; only nn.Module classes defined under {list(trusted)} are rebuilt, "
        "so nothing was built (add a package to trusted_targets only if you trust the file)"
    )


def _module_class(target: Any, trusted: Sequence[str], where: str) -> type[nn.Module]:
    """The class ``target`` names, if it is an ``nn.Module`` defined in a trusted module.

    Only a trusted module is ever imported, and the class is read from that module's own
    namespace, so ``cifarkit.sources.np.savetxt`` (numpy reached through an attribute) and
    ``cifarkit.model.nn.Linear`` (torch's class) are refused like ``os.system``.
    """
    if not isinstance(target, str):
        raise _refuse(where, f"has a _target_ that is not a string ({type(target).__name__})", trusted)
    module_name, _, name = target.rpartition(".")
    if not module_name or not _is_trusted(module_name, trusted):
        raise _refuse(where, f"names _target_={target!r}", trusted)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise _refuse(where, f"names _target_={target!r}, whose module {module_name!r} does not exist", trusted) from None
    obj = vars(module).get(name)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and _is_trusted(obj.__module__, trusted)):
        raise _refuse(where, f"names _target_={target!r}, which is not an nn.Module class defined there", trusted)
    return obj


def check_net_config(node: Any, trusted: Sequence[str], where: str = "net") -> None:
    """Judge a whole saved net config before anything is built: raise ``UserError`` if any part
    is not plain data or a trusted ``nn.Module`` target (nested ones included)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str) or "${" in key or (key.startswith("_") and key != "_target_"):
                raise _refuse(where, f"has the key {key!r} (train.py saves no Hydra keys but _target_, and no interpolation)", trusted)
            if key == "_target_":
                _module_class(value, trusted, where)
            else:
                check_net_config(value, trusted, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_net_config(value, trusted, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise _refuse(where, f"holds an interpolation {node!r}, which train.py never saves", trusted)
    elif not isinstance(node, PLAIN):
        raise _refuse(where, f"holds a {type(node).__name__}, not plain config data", trusted)


def build_net(net_config: dict[str, Any], num_classes: int, trusted: Sequence[str]) -> nn.Module:
    """The net of a saved config, built only after the whole config was judged trustworthy."""
    check_net_config(net_config, trusted)

    def build(node: Any) -> Any:
        if isinstance(node, dict):
            kwargs = {k: build(v) for k, v in node.items() if k != "_target_"}
            return _module_class(node["_target_"], trusted, "net")(**kwargs) if "_target_" in node else kwargs
        return [build(v) for v in node] if isinstance(node, (list, tuple)) else node

    try:
        return build({**net_config, "num_classes": num_classes})
    except (TypeError, ValueError) as e:  # trusted class, arguments it does not take
        raise UserError(f"the checkpoint's net config does not fit {net_config['_target_']} ({e}); pass a .ckpt written by train.py") from e
