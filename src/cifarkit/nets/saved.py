"""Reading a checkpoint a stranger may have made, and rebuilding its net without running its code.

A checkpoint is read once per entry point, always here:

* ``read_checkpoint``: the file through the one tensor-file reader (cifarkit/core/untrusted/tensors.py:
  records checked against the file's size before anything is inflated, ``weights_only``, plain data
  within bounds), then held to be a Lightning checkpoint; or one line naming the option that named it.
* ``SavedNet.read``: what eval.py, predict.py and export.py need from it, checked against a
  schema (pydantic: ``SavedHyperParameters``, ``DataInfo``): the net's config, its weights
  (dense, finite), the ``DataInfo`` it was trained with and the test-time options.
* ``build_net``: the one way a saved net config becomes a module. Every ``_target_`` must
  resolve to an ``nn.Module`` class *defined* in a trusted module (its ``__module__``, not the
  string's prefix), nested configs included; no other Hydra key, no interpolation; numbers,
  strings and lists within bounds. The whole config is judged before any class is called.
* ``SavedNet.rebuild``: the net is first built on PyTorch's meta device (no memory) and its
  shapes compared with the weights, so its real size is bounded by the file's; then built,
  loaded, and run once on a blank image at its recorded size before any door reports ready.

Writing them (atomically, with their ``data_info``) is cifarkit/fit/checkpoint_io.py's ``AtomicCheckpointIO``
and ``ImageClassifier.on_save_checkpoint``. Lightning-free.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from cifarkit.core import rundir
from cifarkit.core.errors import UserError
from cifarkit.core.untrusted import check_tree, invalid, shown
from cifarkit.core.untrusted.tensors import plain_tensor, read_torch_file
from cifarkit.data.augment import TTA
from cifarkit.data.images import DataInfo

PLAIN = (str, int, float, bool, type(None))
FROM_TRAIN = "pass a .ckpt written by train.py"
# Checkpoints written before the package stood in wings name the nets' old module.
MOVED = {"cifarkit.model.": "cifarkit.nets.models."}
# A saved net config's bounds: train.py's nets take a few small numbers, lists of widths and a timm name.
NET_MAX_DEPTH, NET_MAX_NODES = 6, 500
NET_MAX_INT, NET_MAX_STR, NET_MAX_LIST = 65_536, 200, 64


def moved_targets(node: Any) -> Any:
    """``node`` with every ``_target_`` of a module that moved (``MOVED``) named by its new path."""
    if isinstance(node, dict):
        return {k: _moved(v) if k == "_target_" else moved_targets(v) for k, v in node.items()}
    return [moved_targets(v) for v in node] if isinstance(node, list) else node


def _moved(target: Any) -> Any:
    old = next((o for o in MOVED if isinstance(target, str) and target.startswith(o)), None)
    return MOVED[old] + target.removeprefix(old) if old else target


def not_from_train(what: str) -> UserError:
    """A checkpoint that train.py did not write as it is: what is wrong with it, and what to pass instead."""
    return UserError(f"{what}; {FROM_TRAIN}")


def read_checkpoint(path: str | Path, option: str = "ckpt_path") -> dict[str, Any]:
    """Load a checkpoint through the one tensor-file reader (records against the file's size, no code
    runs, plain data within bounds) and check it is a Lightning checkpoint, or stop with one line that
    names ``option``, the option the user set."""
    p = rundir.checkpoint_file(path, option)
    where = f"{option}={shown(path)}"
    ckpt = read_torch_file(p, where, FROM_TRAIN, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise not_from_train(f"{where} is not a Lightning checkpoint (no state_dict)")
    for key in ("hyper_parameters", "data_info", "callbacks"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise not_from_train(f"{where} has a {key} that is a {type(ckpt[key]).__name__}, not a mapping")
    return ckpt


class SavedHyperParameters(BaseModel):
    """The part of a checkpoint's ``hyper_parameters`` that rebuilding its net reads."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    net: dict[str, Any]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    tta: Literal[tuple(TTA)] = "none"  # type: ignore[valid-type]
    channels_last: bool = True


def checked_weights(state_dict: dict[Any, Any], where: str) -> dict[str, torch.Tensor]:
    """The net's own weights (``net.`` keys), each a dense, finite tensor: a sparse tensor, a view that
    broadcasts a few bytes to a large shape, or NaN/inf weights, are refused here."""
    weights = {}
    for key, value in state_dict.items():
        if not (isinstance(key, str) and key.startswith("net.")):
            continue
        if not plain_tensor(value):
            raise not_from_train(f"{where} has a weight {shown(key)[:80]} that is not a plain stored tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise not_from_train(f"{where} has NaN or infinite values in {shown(key)[:80]} (diverged weights)")
        weights[key.removeprefix("net.")] = value
    return weights


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
    option: str = "ckpt_path"  # the option that named the file, for every line about it

    @classmethod
    def read(cls, path: str | Path, option: str = "ckpt_path") -> SavedNet:
        ckpt = read_checkpoint(path, option)
        where = f"{option}={shown(path)}"
        hparams = ckpt.get("hyper_parameters", {})
        net = hparams.get("net")
        if not isinstance(net, dict) or "_target_" not in net:
            raise not_from_train(f"{where} has no net config (hyper_parameters.net)")
        try:
            checked = SavedHyperParameters.model_validate(hparams)
        except ValidationError as e:
            raise not_from_train(f"{where} has invalid hyper_parameters ({invalid(e)})") from None
        return cls(
            Path(path),
            DataInfo.check(ckpt.get("data_info"), where),
            moved_targets(net),
            checked_weights(ckpt["state_dict"], where),
            checked.label_smoothing,
            checked.channels_last,
            checked.tta,
            option,
        )

    def rebuild(self, trusted: Sequence[str]) -> nn.Module:
        """The net with its trained weights (CPU, eval mode), built under the trust rules, its size
        bounded by its weights', and run once at its image size."""
        where = f"{self.option}={shown(self.path)}"
        shapes = {
            k: tuple(v.shape)
            for k, v in build_net(self.net_config, len(self.data.classes), trusted, "meta").state_dict().items()
        }
        wrong = sorted(set(shapes) ^ set(self.weights)) or [
            k for k in shapes if shapes[k] != tuple(self.weights[k].shape)
        ]
        if wrong:  # the net is not built at all: a crafted config cannot ask for more memory than its file holds
            raise not_from_train(
                f"{where}: its weights do not fit its net config ({len(wrong)} missing, extra or odd-shaped, "
                f"e.g. {shown(wrong[0])[:80]})"
            )
        net = build_net(self.net_config, len(self.data.classes), trusted)
        try:
            net.load_state_dict(self.weights)
        except (RuntimeError, TypeError) as e:  # a dtype that cannot be copied in
            raise not_from_train(
                f"{where}: its weights do not fit its net config ({shown(str(e).splitlines()[0])[:200]})"
            ) from e
        return ready(net.eval(), self.data.image_size, len(self.data.classes), where)


@torch.no_grad()
def ready(net: nn.Module, image_size: int, num_classes: int, where: str) -> nn.Module:
    """``net`` once it has classified one blank image at its own size into finite scores for each
    class: a net that cannot take its recorded size is refused now, not on every request."""
    try:
        out = net(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:
        raise not_from_train(
            f"{where}: its net cannot classify a {image_size}x{image_size} image, its recorded size "
            f"({shown(' '.join(str(e).split()))[:200]})"
        ) from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes) or not bool(torch.isfinite(out).all()):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise not_from_train(
            f"{where}: its net gives {shape} scores, or not finite ones, for one blank image of its "
            f"{num_classes} classes"
        )
    return net


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
    namespace, so ``cifarkit.data.sources.np.savetxt`` (numpy reached through an attribute) and
    ``cifarkit.nets.models.nn.Linear`` (torch's class) are refused like ``os.system``.
    """
    if not isinstance(target, str):
        raise _refuse(where, f"has a _target_ that is not a string ({type(target).__name__})", trusted)
    module_name, _, name = target.rpartition(".")
    if not module_name or not _is_trusted(module_name, trusted):
        raise _refuse(where, f"names _target_={shown(repr(target))[:120]}", trusted)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise _refuse(
            where, f"names _target_={shown(repr(target))[:120]}, whose module does not exist", trusted
        ) from None
    obj = vars(module).get(name)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and _is_trusted(obj.__module__, trusted)):
        raise _refuse(
            where, f"names _target_={shown(repr(target))[:120]}, which is not an nn.Module class defined there", trusted
        )
    return obj


def check_net_config(node: Any, trusted: Sequence[str], where: str = "net") -> None:
    """Judge a whole saved net config before anything is built: raise ``UserError`` if any part
    is not plain data within bounds or a trusted ``nn.Module`` target (nested ones included)."""
    if where == "net":  # before anything walks it recursively
        check_tree(node, "the checkpoint's net config", FROM_TRAIN, NET_MAX_DEPTH, NET_MAX_NODES)
    if isinstance(node, (dict, list, tuple)) and len(node) > NET_MAX_LIST:
        raise _bound(where, f"holds {len(node)} entries (at most {NET_MAX_LIST})")
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str) or "${" in key or (key.startswith("_") and key != "_target_"):
                raise _refuse(
                    where,
                    f"has the key {shown(repr(key))[:200]} (train.py saves no Hydra keys but _target_, and no "
                    "interpolation)",
                    trusted,
                )
            _check_scalar(key, f"{where} key")
            if key == "_target_":
                _check_scalar(value, f"{where}._target_")
                _module_class(value, trusted, where)
            else:
                check_net_config(value, trusted, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_net_config(value, trusted, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise _refuse(where, f"holds an interpolation {shown(repr(node))[:200]}, which train.py never saves", trusted)
    elif not isinstance(node, PLAIN):
        raise _refuse(where, f"holds a {type(node).__name__}, not plain config data", trusted)
    else:
        _check_scalar(node, where)


def _check_scalar(value: Any, where: str) -> None:
    """A number, or a string, of a size train.py's net configs never exceed."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > NET_MAX_INT:
        raise _bound(where, f"is {value} (at most {NET_MAX_INT} in size)")
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= NET_MAX_INT):
        raise _bound(where, f"is {value} (a finite number at most {NET_MAX_INT} in size)")
    if isinstance(value, str) and (len(value) > NET_MAX_STR or not value.isprintable()):
        raise _bound(where, f"is a string of {len(value)} characters (at most {NET_MAX_STR}, all printable)")


def _bound(where: str, what: str) -> UserError:
    return not_from_train(f"the checkpoint's {where} {what}, out of bounds for a net train.py saves")


def build_net(
    net_config: dict[str, Any], num_classes: int, trusted: Sequence[str], device: str | None = None
) -> nn.Module:
    """The net of a saved config, built (on ``device``: ``"meta"`` allocates nothing) only after
    the whole config was judged trustworthy."""
    check_net_config(net_config, trusted)

    def build(node: Any) -> Any:
        if isinstance(node, dict):
            kwargs = {k: build(v) for k, v in node.items() if k != "_target_"}
            return _module_class(node["_target_"], trusted, "net")(**kwargs) if "_target_" in node else kwargs
        return [build(v) for v in node] if isinstance(node, (list, tuple)) else node

    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return build({**net_config, "num_classes": num_classes})
    except UserError:
        raise
    except Exception as e:
        why = shown(" ".join(str(e).split()))[:200]
        raise not_from_train(
            f"the checkpoint's net config does not fit {shown(net_config['_target_'])[:120]} "
            f"({e.__class__.__name__}: {why})"
        ) from e
