"""Where a net's first weights come from: timm's pretrained weights, or another run's checkpoint.

* ``model.net.pretrained=true`` / ``model.net.weights=<file>`` (timm nets): the weights timm
  loads for the net, from its hub or from a local file (safetensors, or a PyTorch state dict, read
  once by the trust layer's ``read_weights_file`` and handed to timm as tensors), through timm's own
  loading path, so its handling of the head,
  the input stem and the pretrained config applies. They are start options, not part of the
  net: ``split_timm_start`` takes them out of the net's config, whose checkpoint then rebuilds
  the net from its own weights without any download.
* ``model.init_from=<.ckpt>`` (any net): another run's weights, read and judged as every
  checkpoint is (cifarkit/nets/saved.py). Every tensor must fit this net, but the head.

The head is what depends on the class count (``head_names``): it starts new unless the start
was made for the same classes. A start also says how its net was fed (mean/std), which the
data then uses unless ``data.mean``/``data.std`` say otherwise. ``ImageClassifier.setup`` loads
a start when a fit begins; a resumed run's own weights replace it afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarkit.core.errors import UserError, existing
from cifarkit.core.untrusted import shown
from cifarkit.core.untrusted.tensors import read_weights_file
from cifarkit.nets.models import _timm
from cifarkit.nets.saved import SavedNet

log = logging.getLogger(__name__)
TIMM_NET = "cifarkit.nets.models.TimmNet"


@dataclass(frozen=True)
class Start:
    """Weights to start a net from, and how that net was fed."""

    source: str  # for the log
    weights: dict[str, torch.Tensor]  # keys of this net's state dict
    same_classes: bool  # made for the data's classes: the head is loaded too
    strict: bool  # every other tensor must fit (else a tensor that does not fit starts new: a new stem)
    mean: list[float] | None
    std: list[float] | None


@dataclass(frozen=True)
class TimmWeights:
    """``model.net.pretrained`` / ``model.net.weights`` of a timm net: what to load, once built."""

    name: str  # as given, a pretrained tag included (resnet50.a1_in1k)
    file: str | None
    num_classes: int  # of the pretrained head
    mean: list[float]
    std: list[float]


def split_timm_start(net: dict[str, Any]) -> tuple[dict[str, Any], TimmWeights | None]:
    """A net config without its start options, the others' nulls resolved, and what to load.

    Pretrained or not, ``cifar_stem: null`` is the CIFAR stem for an untrained net and timm's own
    stem for a pretrained one, and ``input_size: null`` the pretrained config's input size (e.g.
    224) where timm's stem is kept, else none (fed at the data's size). The config kept is what
    a checkpoint rebuilds: the architecture, with the input size it was trained at.
    """
    if net.get("_target_") != TIMM_NET:
        return net, None
    net = dict(net)
    pretrained, file = net.pop("pretrained", False), net.pop("weights", None)
    weights = None
    if pretrained or file is not None:
        timm = _timm()
        name = str(net["name"])
        try:
            cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError as e:  # an unknown tag, or an architecture without pretrained weights
            raise UserError(
                f"timm has no pretrained config for model.net.name={name} ({e}); "
                "list them with python -c 'import timm; print(timm.list_pretrained())'"
            ) from e
        if file is not None:
            existing("model.net.weights", file, f"a .safetensors or .pth file of {name}'s weights")
        net["name"] = timm.models.split_model_name_tag(name)[0]  # the architecture: the tag picks weights
        weights = TimmWeights(name, None if file is None else str(file), cfg.num_classes, list(cfg.mean), list(cfg.std))
        if net.get("cifar_stem") is None:
            net["cifar_stem"] = False
        if net.get("input_size") is None and not net["cifar_stem"]:
            net["input_size"] = int(cfg.input_size[-1])
    elif net.get("cifar_stem") is None:
        net["cifar_stem"] = True
    if net.get("input_size") is None:
        net.pop("input_size", None)
    return net, weights


def timm_start(weights: TimmWeights, net: nn.Module, num_classes: int) -> Start:
    """The timm net's pretrained weights, loaded by timm into a net built as ``net`` was."""
    timm = _timm()
    overlay = None
    if weights.file is not None:  # read once, by the trust layer; timm gets the tensors, not the file
        fix = f"pass a .safetensors or .pth file of {weights.name}'s weights; nothing in it was run"
        overlay = {"state_dict": read_weights_file(Path(weights.file), f"model.net.weights={shown(weights.file)}", fix)}
    try:
        source = timm.create_model(
            weights.name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **net.timm_kwargs
        )
    except Exception as e:
        why = f"{e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if weights.file is not None:
            what = f"model.net.weights={weights.file} does not load into timm's {weights.name}"
            fix = "pass a file of that net's weights"
        else:
            what = f"timm could not load {weights.name}'s pretrained weights"
            fix = "without a network, download them elsewhere and pass model.net.weights=<file> (.safetensors or .pth)"
        raise UserError(f"{what} ({why}); {fix}") from e
    where = weights.file or "timm's hub"
    return Start(
        f"timm's {weights.name} ({where})",
        {f"model.{k}": v for k, v in source.state_dict().items()},
        same_classes=num_classes == weights.num_classes,
        strict=False,
        mean=weights.mean,
        std=weights.std,
    )


def checkpoint_start(path: str, net: dict[str, Any], classes: list[str]) -> Start:
    """Another run's net weights, read and judged as every checkpoint is, for a net of the same class."""
    saved = SavedNet.read(path, option="model.init_from")
    if saved.net_config["_target_"] != net["_target_"]:
        raise UserError(
            f"model.init_from={shown(path)} holds a {shown(saved.net_config['_target_'])[:120]}, this run's net is "
            f"a {net['_target_']}; pick the same model as that run"
        )
    return Start(
        f"model.init_from={path}",
        saved.weights,
        same_classes=saved.data.classes == list(classes),
        strict=True,
        mean=saved.data.mean,
        std=saved.data.std,
    )


def head_names(build: Callable[[int], nn.Module], num_classes: int) -> set[str]:
    """The tensors of ``build(num_classes)`` whose shape follows the class count: the net's head.
    Found by building it for one class more (global RNG untouched), so any net qualifies."""
    with torch.random.fork_rng(devices=[]):
        shapes = {k: v.shape for k, v in build(num_classes).state_dict().items()}
        other = {k: v.shape for k, v in build(num_classes + 1).state_dict().items()}
    return {k for k, shape in shapes.items() if other.get(k) != shape}


def load_start(net: nn.Module, start: Start, head: set[str]) -> None:
    """Copy the start's tensors into ``net`` and log which were loaded and which start new."""
    state = net.state_dict()
    new = sorted(k for k in state if k in head and not start.same_classes)
    misfit = [k for k in state if k not in new and (k not in start.weights or start.weights[k].shape != state[k].shape)]
    extra = sorted(k for k in start.weights if k not in state)
    if start.strict and (misfit or extra):

        def why(k: str) -> str:
            if k not in start.weights:
                return f"{k} is not in it"
            if k not in state:
                return f"{k} is not in this net"
            return f"{k} is {tuple(start.weights[k].shape)} there, {tuple(state[k].shape)} here"

        raise UserError(
            f"{start.source} does not fit this net ({len(misfit) + len(extra)} tensors differ: "
            f"{'; '.join(why(k) for k in (misfit + extra)[:3])}); start from a run of the same net "
            "(its model.net options as in that run)"
        )
    new += misfit
    loaded = {k: v for k, v in start.weights.items() if k in state and k not in new}
    net.load_state_dict({**state, **loaded})
    log.info(
        "started from %s: %d of %d tensors loaded; new: %s",
        start.source,
        len(loaded),
        len(state),
        ", ".join(sorted(new)) or "none",
    )
