"""Checkpoints: written atomically, carried into a resumed run, loaded safely, trusted, rebuilt.

A checkpoint is a file a stranger can hand you, so ``eval.py``, ``predict.py`` and
``export.py`` all come through here:

* ``load_checkpoint``: ``torch.load(weights_only=True)`` (no pickled code runs), or one line.
* ``data_info``: the classes, mean/std and image size the net was trained with, checked.
* ``rebuild_net`` / ``rebuild_classifier``: the net from the checkpoint's own config, where
  every ``_target_`` must resolve to an ``nn.Module`` class *defined* in a trusted module (its
  ``__module__``, not the string's prefix), nested configs included; no other Hydra key, no
  interpolation. The whole config is judged before any class is called.

``atomic_write`` (cifarkit/files.py) is the one way the project writes a file that a reader may
open at any moment (checkpoints, the dataset cache, metrics.json, pictures): a crash leaves the
old file or none.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from cifarkit.errors import UserError
from cifarkit.files import atomic_write

PLAIN = (str, int, float, bool, type(None))
DATA_INFO_KEYS = ("classes", "mean", "std", "image_size")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through ``atomic_write``: a run killed mid-save keeps the
    previous ``last.ckpt`` intact (at worst a hidden ``.last.ckpt.*.tmp`` after a SIGKILL)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class CarryCheckpoints(L.Callback):
    """Resuming into a new run folder keeps ``ModelCheckpoint``'s best and top-k.

    ``ckpt_path=<old run>/checkpoints/last.ckpt`` starts a new run folder, and Lightning's
    ``ModelCheckpoint`` forgets its scores when its folder changes: the resumed run would
    then pick its best among the new epochs only and test other weights than a run that was
    never stopped. The kept checkpoints are linked (or copied) into the new folder and the
    saved state is pointed at them before ``ModelCheckpoint`` loads it.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks", {})
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key)
            if not state or not cb.dirpath or state.get("dirpath") in (None, cb.dirpath):
                continue
            new = Path(cb.dirpath)
            if trainer.is_global_zero:
                new.mkdir(parents=True, exist_ok=True)
                for old in state.get("best_k_models", {}):
                    _link_or_copy(Path(old), new / Path(old).name)
            trainer.strategy.barrier("CarryCheckpoints")

            def moved(p: str) -> str:
                return str(new / Path(p).name) if p else p

            kept = {moved(p): v for p, v in state.get("best_k_models", {}).items()}
            state["best_k_models"] = {p: v for p, v in kept.items() if Path(p).is_file()}
            for key in ("best_model_path", "kth_best_model_path"):  # empty where the old file is gone
                path = moved(state.get(key, ""))
                state[key] = path if path in state["best_k_models"] else ""
            state["last_model_path"] = moved(state.get("last_model_path", ""))
            state["dirpath"] = cb.dirpath


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() or not src.is_file():
        return
    try:
        os.link(src, dst)  # no extra disk; ModelCheckpoint deleting it later leaves the old run's file
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------
# Loading and trusting.


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (no code runs: ``weights_only``) or stop with one clear line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"ckpt_path={path} does not exist; pass the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"ckpt_path={path} is not a readable checkpoint ({e.__class__.__name__}); pass a .ckpt written by train.py") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by train.py")
    return ckpt


def data_info(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """How the net's images were prepared: class names in order, mean/std, image size."""
    info = ckpt.get("data_info")
    ok = (
        isinstance(info, dict)
        and set(DATA_INFO_KEYS) <= info.keys()
        and isinstance(info["classes"], list) and len(info["classes"]) >= 2
        and all(isinstance(c, str) for c in info["classes"])
        and all(isinstance(info[k], list) and len(info[k]) == 3 for k in ("mean", "std"))
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for k in ("mean", "std") for v in info[k])
        and all(v > 0 for v in info["std"])
        and isinstance(info["image_size"], int) and not isinstance(info["image_size"], bool) and info["image_size"] > 0
    )
    if not ok:
        raise UserError(f"ckpt_path={path} lacks a valid data_info (classes, mean/std, image size); pass a .ckpt written by train.py")
    return {k: info[k] for k in DATA_INFO_KEYS}


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
    namespace, so ``cifarkit.data.np.savetxt`` (numpy reached through an attribute) and
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


def _build(node: Any, trusted: Sequence[str]) -> Any:
    if isinstance(node, dict):
        kwargs = {k: _build(v, trusted) for k, v in node.items() if k != "_target_"}
        return _module_class(node["_target_"], trusted, "net")(**kwargs) if "_target_" in node else kwargs
    if isinstance(node, (list, tuple)):
        return [_build(v, trusted) for v in node]
    return node


def build_net(net_cfg: Any, num_classes: int, trusted: Sequence[str]) -> nn.Module:
    """The net of a saved config, built only after the whole config was judged trustworthy."""
    if not isinstance(net_cfg, dict) or "_target_" not in net_cfg:
        raise UserError("the checkpoint has no net config (hyper_parameters.net); pass a .ckpt written by train.py")
    check_net_config(net_cfg, trusted)
    try:
        return _build({**net_cfg, "num_classes": num_classes}, trusted)
    except (TypeError, ValueError) as e:  # trusted class, arguments it does not take
        raise UserError(f"the checkpoint's net config does not fit {net_cfg['_target_']} ({e}); pass a .ckpt written by train.py") from e


def rebuild_net(path: str | Path, trusted: Sequence[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's net with its trained weights (CPU, eval mode), and its data_info."""
    ckpt = load_checkpoint(path)
    info = data_info(ckpt, path)
    hparams = ckpt.get("hyper_parameters")
    net = build_net(hparams.get("net") if isinstance(hparams, dict) else None, len(info["classes"]), trusted)
    weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if isinstance(k, str) and k.startswith("net.")}
    try:
        net.load_state_dict(weights)
    except (RuntimeError, TypeError) as e:  # missing or odd-shaped weights
        raise UserError(f"ckpt_path={path}: its weights do not fit its net config ({str(e).splitlines()[0]}); pass a .ckpt written by train.py") from e
    return net.eval(), info


def rebuild_classifier(ckpt: dict[str, Any], path: str | Path, trusted: Sequence[str], tta: str | None = None) -> L.LightningModule:
    """An ``ImageClassifier`` for testing, its net rebuilt under the trust rules (weights not
    loaded); ``tta`` the test-time augmentation (None: the checkpoint's own)."""
    from cifarkit.module import TTA, ImageClassifier

    info = data_info(ckpt, path)
    hparams = ckpt.get("hyper_parameters")
    hparams = hparams if isinstance(hparams, dict) else {}
    smoothing = hparams.get("label_smoothing", 0.0)
    if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) or not 0 <= smoothing < 1:
        raise UserError(f"ckpt_path={path} has label_smoothing={smoothing!r}; pass a .ckpt written by train.py")
    channels_last = hparams.get("channels_last", True) is True
    tta = tta if tta is not None else hparams.get("tta", "none")
    if tta not in TTA:
        raise UserError(f"tta={tta!r} is not known; use one of {', '.join(TTA)}")
    net = build_net(hparams.get("net"), len(info["classes"]), trusted)
    return ImageClassifier(net=net, classes=info["classes"], optimizer={}, label_smoothing=float(smoothing),
                           channels_last=channels_last, tta=tta)
