"""The one schema of the config options, checked once a config is composed: ``check(cfg)``.

Every entry point's config (picked by ``task_name``) and every group that has options of the
project's own (data, model, trainer, paths, the top-level keys) is a typed mapping here, with
its bounds; the YAML under configs/ states the defaults, this module only what a value may be. A
bad value stops the run in one line that names the full key, the value and what is allowed
(``data.batch_size=-3: must be an integer of at least 1``), before anything is built.

pydantic rather than Hydra's structured configs: the project already holds the metadata of a
stranger's checkpoint to pydantic schemas (cifarkit/nets/saved.py, cifarkit/data/images.py), and the
presets compose as plain YAML, which structured configs would have to be rewritten around.
Mappings are ``TypedDict``s so that a key a preset may leave out is ``NotRequired`` rather than
given a second default. Unknown keys are refused where a typo would otherwise pass silently
(``+data.colour=1``) and allowed where users add their own (Lightning Trainer arguments, a net's
or an optimizer's keyword arguments, callbacks and loggers of any class). Torch-free, so a bad
option costs one line before the training stack loads.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import AfterValidator, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, with_config
from pydantic_core import PydanticCustomError
from typing_extensions import NotRequired, TypedDict

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted import shown

CLOSED = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)  # a typo in a key is refused
OPEN = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # users add their own keys

Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
StepsOrFraction = Annotated[NonNegative | Fraction, Field(description="a count (an integer) or a fraction from 0 to 1")]
TTA = ("none", "flip", "flip_translate")  # cifarkit/data/augment.py's test-time views (a test checks they agree)
TIMM_NET = "cifarkit.nets.models.TimmNet"
Device = Literal["auto", "cpu", "gpu", "cuda", "mps"]


def rule(text: str) -> PydanticCustomError:
    """A broken rule between options, its whole line written by the caller (keys, values, the fix)."""
    return PydanticCustomError("cifarkit", "{text}", {"text": text})


@with_config(OPEN)
class Targeted(TypedDict):
    """Anything Hydra instantiates: its class, and keyword arguments of the class's own."""

    _target_: str


def by_target(known: dict[str, Any], other: Any) -> Any:
    """The schema of a mapping chosen by its ``_target_``: ``known``'s, else ``other``."""

    def tag(value: Any) -> str:
        return value.get("_target_") if isinstance(value, dict) and value.get("_target_") in known else "other"

    members = tuple(Annotated[schema, Tag(target)] for target, schema in known.items())
    return Annotated[Union[(*members, Annotated[other, Tag("other")])], Discriminator(tag)]  # noqa: UP007


# ---------------------------------------------------------------------------------------------
# data: configs/data/common/pipeline.yaml and each source's own keys.


@with_config(CLOSED)
class Crop(TypedDict):
    padding: NonNegative
    mode: Literal["zeros", "reflect"]


@with_config(CLOSED)
class Flip(TypedDict):
    p: Fraction


@with_config(CLOSED)
class AlternatingFlip(TypedDict):
    pass


@with_config(CLOSED)
class Cutout(TypedDict):
    size: NonNegative


@with_config(CLOSED)
class AugMix(TypedDict):
    width: Annotated[int, Field(ge=1, le=16)]
    depth: Annotated[int, Field(ge=0, le=16)]
    severity: Annotated[int, Field(ge=1, le=10)]
    views: Annotated[int, Field(ge=0, le=4)]


@with_config(CLOSED)
class Augment(TypedDict):
    crop: NotRequired[Crop | None]
    flip: NotRequired[Flip | None]
    alternating_flip: NotRequired[AlternatingFlip | None]
    cutout: NotRequired[Cutout | None]
    augmix: NotRequired[AugMix | None]


def _distinct(classes: list[str]) -> list[str]:
    if len(set(classes)) < len(classes):
        raise rule(f"data.classes={classes} names a class twice; name at least 2 different classes (null keeps all)")
    return classes


Stats = Annotated[list[float], Field(min_length=3, max_length=3)]


@with_config(CLOSED)
class Pipeline(TypedDict):
    _target_: str
    cache_dir: str
    classes: Annotated[list[str], Field(min_length=2), AfterValidator(_distinct)] | None
    train_per_class: Count | None
    image_size: Annotated[int, Field(ge=8)]
    val_size: Annotated[
        NonNegative | Annotated[float, Field(ge=0, lt=1)], Field(description="an image count, or a fraction below 1")
    ]
    split_seed: int
    folds: Annotated[int, Field(ge=2)] | None
    fold: NonNegative | Literal["all"]
    batch_size: Count
    eval_batch_size: Count
    pipeline: Literal["device", "torchvision"]
    augment: Augment
    normalize: bool
    mean: Stats | None
    std: Annotated[list[Positive], Field(min_length=3, max_length=3)] | None
    num_workers: NonNegative
    pin_memory: bool


def _pipeline_rules(data: dict[str, Any]) -> dict[str, Any]:
    steps = {k: v for k, v in data["augment"].items() if v is not None}
    if "flip" in steps and "alternating_flip" in steps:
        raise rule("data.augment has both flip and alternating_flip; keep one (set the other to null)")
    crop = steps.get("crop")
    if crop and crop["mode"] == "reflect" and crop["padding"] >= data["image_size"]:
        raise rule(
            f"data.augment.crop.padding={crop['padding']} must be below data.image_size ({data['image_size']}) to "
            "reflect"
        )
    if data["pipeline"] == "torchvision" and ({"alternating_flip", "cutout", "augmix"} & set(steps)):
        raise rule(
            "data.augment.alternating_flip, cutout and augmix run on the device pipeline only; use data.pipeline=device"
        )
    if (data["mean"] is None) != (data["std"] is None):
        raise rule("set both data.mean and data.std, or neither (then they are computed)")
    if data["fold"] == "all" and data["folds"] is None:
        raise rule("data.fold=all trains every fold of data.folds=K; set data.folds too")
    if data["folds"] is not None and data["fold"] != "all" and not data["fold"] < data["folds"]:
        raise rule(f"data.fold={data['fold']} must be below data.folds={data['folds']} (folds count from 0), or all")
    return data


def _official_size(data: dict[str, Any]) -> dict[str, Any]:
    if data["image_size"] != 32:
        raise rule(
            f"data.image_size={data['image_size']}: this source's images are 32x32; use data=image_folder to resize"
        )
    return data


@with_config(CLOSED)
class Downloaded(Pipeline):
    data_dir: str
    download: bool


@with_config(CLOSED)
class CIFAR100(Downloaded):
    labels: Literal["fine", "coarse"]


@with_config(CLOSED)
class SVHN(Downloaded):
    extra: bool


@with_config(CLOSED)
class ImageFolder(Pipeline):
    root: str


@with_config(OPEN)
class OtherSource(Pipeline):
    """A DataModule of the user's (``data._target_=mypackage.MyData``): the shared options, and its own."""


SOURCES = "cifarkit.data.sources."
Official = (AfterValidator(_official_size), AfterValidator(_pipeline_rules))
Data = by_target(
    {
        f"{SOURCES}CIFAR10DataModule": Annotated[(Downloaded, *Official)],
        f"{SOURCES}CIFAR100DataModule": Annotated[(CIFAR100, *Official)],
        f"{SOURCES}SVHNDataModule": Annotated[(SVHN, *Official)],
        f"{SOURCES}ImageFolderDataModule": Annotated[ImageFolder, AfterValidator(_pipeline_rules)],
    },
    Annotated[OtherSource, AfterValidator(_pipeline_rules)],
)


# ---------------------------------------------------------------------------------------------
# model: configs/model/common/classifier.yaml; the net and the optimizer take any keyword arguments.


@with_config(CLOSED)
class WarmupThenDecay(TypedDict):
    _target_: str
    _partial_: bool
    warmup: Annotated[float, Field(ge=0, lt=1)]
    decay: Literal["linear", "cosine"]
    start_scale: NotRequired[Annotated[float, Field(ge=0)]]
    final_scale: NotRequired[Annotated[float, Field(ge=0)]]


@with_config(CLOSED)
class ParamGroups(TypedDict, total=False):
    decay_norm_and_bias: bool
    norm_bias_lr_scale: Positive
    body_lr_scale: Annotated[float, Field(ge=0)]


@with_config(CLOSED)
class Classifier(TypedDict):
    _target_: str
    _recursive_: bool
    net: Targeted
    optimizer: Targeted
    scheduler: by_target({"cifarkit.fit.optim.warmup_then_decay": WarmupThenDecay}, Targeted) | None
    param_groups: ParamGroups | None
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    consistency: Annotated[float, Field(ge=0)]
    tta: Literal[TTA]
    channels_last: bool
    init_from: str | None
    reuse_memory: bool
    bf16_weight_copy: bool
    compile: Annotated[bool | str, Field(description="true, false or a torch.compile mode (e.g. reduce-overhead)")]


def _one_start(model: dict[str, Any]) -> dict[str, Any]:
    net = model["net"]
    timm_start = net["_target_"] == TIMM_NET and (net.get("pretrained") or net.get("weights") is not None)
    if model["init_from"] is not None and timm_start:
        raise rule("model.init_from and model.net.pretrained/weights both give the first weights; keep one")
    return model


Model = Annotated[Classifier, AfterValidator(_one_start)]


# ---------------------------------------------------------------------------------------------
# trainer: the keys configs/trainer/*.yaml and the debug presets set; any other Trainer argument passes.

PRECISIONS = (
    "auto",  # cifarkit/core/devices.py's choice
    *("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed"),
    *("32-true", "64-true", 64, 32, 16, "64", "32", "16", "bf16"),  # Lightning's, with its aliases
)


@with_config(OPEN)
class Trainer(TypedDict):
    _target_: str
    default_root_dir: str
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu", "xla"]
    devices: Annotated[
        Annotated[int, Field(ge=-1)] | Annotated[list[NonNegative], Field(min_length=1)] | str,
        Field(description="a device count (-1: all), a list of device indices, or auto"),
    ]
    precision: Literal[PRECISIONS]
    max_epochs: Annotated[int, Field(ge=-1)] | None
    max_steps: Annotated[int, Field(ge=-1)]
    max_time: Annotated[
        Annotated[str, Field(pattern=r"^\d+:\d+:\d+:\d+$")] | dict[str, float] | None,
        Field(description="DD:HH:MM:SS (e.g. 00:00:10:00), a mapping such as {minutes: 10}, or null"),
    ]
    num_nodes: NotRequired[Count]
    strategy: NotRequired[str | Targeted]
    sync_batchnorm: NotRequired[bool]
    fast_dev_run: NotRequired[bool | NonNegative]
    limit_train_batches: NotRequired[StepsOrFraction]
    limit_val_batches: NotRequired[StepsOrFraction]
    limit_test_batches: NotRequired[StepsOrFraction]
    overfit_batches: NotRequired[StepsOrFraction]


# ---------------------------------------------------------------------------------------------
# Groups open by nature: any Lightning logger or callback; the project's own callbacks by their options.


@with_config(CLOSED)
class Lookahead(TypedDict):
    _target_: str
    every_n_steps: Count
    decay: Fraction
    power: Annotated[float, Field(ge=0)]
    use_buffers: bool


@with_config(CLOSED)
class FreezeParameters(TypedDict):
    _target_: str
    names: list[str]
    after: Fraction


@with_config(CLOSED)
class HeadFirst(TypedDict):
    _target_: str
    until: Fraction


Callback = by_target(
    {
        "cifarkit.fit.optim.Lookahead": Lookahead,
        "cifarkit.fit.optim.FreezeParameters": FreezeParameters,
        "cifarkit.fit.optim.HeadFirst": HeadFirst,
    },
    Targeted,
)
Callbacks = dict[str, Callback | None] | None
Loggers = dict[str, Targeted | None] | None


@with_config(CLOSED)
class Paths(TypedDict):
    data_dir: str
    log_dir: str
    output_dir: str
    checkpoint_dir: str


# ---------------------------------------------------------------------------------------------
# Each entry point's config: its top-level keys and its groups.

NetOptions = Annotated[dict[str, Any], Field(min_length=1)]


@with_config(CLOSED)
class Train(TypedDict):
    task_name: Literal["train"]
    tags: list[str]
    seed: int
    test: bool
    ckpt_path: str | None
    optimized_metric: str
    budget_s: Annotated[Positive | None, Field(description="seconds of training above 0, or null")]
    budget_nets: Annotated[
        list[NetOptions] | None, Field(description="a list of model.net options (mappings), narrowest first, or null")
    ]
    budget_stopped_at: Annotated[
        Annotated[int, Field(ge=1)] | None, Field(description="the step a budget run was stopped at, or null")
    ]
    optuna_trial: NotRequired[NonNegative | None]  # configs/hparams_search: set by the sweeper
    data: Data
    model: Model
    trainer: Trainer
    logger: NotRequired[Loggers]  # logger=null drops the key
    callbacks: NotRequired[Callbacks]
    paths: Paths


# cifarkit/robust/corruptions.py's names (a test checks they agree)
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow",
    "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip


@with_config(CLOSED)
class Robustness(TypedDict):
    """configs/robustness/cifar10c.yaml: eval.py's corruption benchmark."""

    corruptions: Annotated[list[Literal[CORRUPTIONS]], Field(min_length=1)]
    severities: Annotated[list[Annotated[int, Field(ge=1, le=5)]], Field(min_length=1)]
    images: Count | None
    seed: int
    batch_size: Count


@with_config(CLOSED)
class Eval(TypedDict):
    task_name: Literal["eval"]
    tags: list[str]
    seed: int
    ckpt_path: str
    tta: Literal[TTA] | None
    trusted_targets: list[str]
    robustness: NotRequired[Robustness | None]
    data: Data
    trainer: Trainer
    logger: NotRequired[Loggers]  # logger=null drops the key
    callbacks: NotRequired[Callbacks]
    paths: Paths


@with_config(CLOSED)
class Predict(TypedDict):
    task_name: Literal["predict"]
    ckpt_path: str
    inputs: str
    format: Literal["text", "json"]
    top_k: Count
    max_megapixels: Positive
    device: Device
    trusted_targets: list[str]
    paths: Paths


def _suffix_of_format(cfg: dict[str, Any]) -> dict[str, Any]:
    output, fmt = cfg["output"], cfg["format"]
    if output is not None and PurePath(output).suffix != f".{fmt}":
        raise rule(
            f"output={output} does not end in .{fmt}; name the {fmt} file *.{fmt} (predict.py goes by the suffix)"
        )
    return cfg


@with_config(CLOSED)
class Export(TypedDict):
    task_name: Literal["export"]
    ckpt_path: str
    format: Literal["onnx", "pt2"]
    output: str | None
    trusted_targets: list[str]
    paths: Paths


@with_config(CLOSED)
class Serve(TypedDict):
    task_name: Literal["serve"]
    ckpt_path: str
    host: Annotated[
        Literal["127.0.0.1", "0.0.0.0", "::"],
        Field(description="127.0.0.1 (this machine), or 0.0.0.0 or :: (every interface), the addresses LitServe binds"),
    ]
    port: Annotated[int, Field(ge=1024, le=65535)]
    device: Device
    top_k: Count
    max_batch_size: Count
    batch_timeout: Annotated[float, Field(ge=0)]
    max_body_mb: Positive
    max_megapixels: Positive
    decode_threads: Count
    read_timeout: Positive
    max_connections: Count
    threads: Count | None
    api_key_file: str | None
    allow_anonymous: bool
    max_decode_queue: Annotated[int, Field(ge=0)]
    keep_alive: Positive
    max_headers: Count
    max_header_kb: Positive
    max_requests: Count
    drain_grace: Annotated[float, Field(ge=0)]
    request_log: Literal["text", "json", "none"]
    fast_queue: bool
    trusted_targets: list[str]
    paths: Paths


TASKS: dict[str, Any] = {
    "train": Train,
    "eval": Eval,
    "predict": Predict,
    "export": Annotated[Export, AfterValidator(_suffix_of_format)],
    "serve": Serve,
}


# ---------------------------------------------------------------------------------------------
# Checking a composed config, and saying what is wrong in one line.


def check(cfg: DictConfig) -> None:
    """Refuse a composed config whose options break the schema, in one line (key, value, what is
    allowed), before anything is built; Hydra's own node is not an option and is left out."""
    unresolved: list[tuple[Any, ...]] = []
    values = _plain(cfg, (), unresolved)
    values.pop("hydra", None)
    task = values.get("task_name")
    if task not in TASKS:
        raise UserError(f"task_name={_shown(task)}: must be one of {', '.join(TASKS)}")
    try:
        _adapter(task).validate_python(values)
    except ValidationError as e:
        wrong = [w for w in (_Wrong(err, values) for err in e.errors()) if not w.under(unresolved)]
        wrong.sort(key=lambda w: w.err["type"] != "extra_forbidden")  # a mistyped key explains a missing one
        if wrong:
            raise UserError(_line(wrong, _adapter(task).json_schema())) from None


@cache
def _adapter(task: str) -> TypeAdapter:
    return TypeAdapter(TASKS[task])


def _plain(node: Any, path: tuple[Any, ...], unresolved: list[tuple[Any, ...]]) -> Any:
    """``node`` as plain data, resolved where it can be: a value whose interpolation cannot resolve
    yet (``${hydra:...}`` before Hydra's run starts) stays its text, listed in ``unresolved``; a
    mandatory value not given (``???``) is left out, so that the schema reports it missing."""
    if not isinstance(node, DictConfig | ListConfig) or node._is_none():
        return node
    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    out: dict[Any, Any] = {}
    for key in keys:
        if OmegaConf.is_missing(node, key):
            continue
        try:
            value = node[key]
        except Exception:  # a resolver that cannot run yet, or fails on another bad value
            unresolved.append((*path, key))
            value = node._get_node(key)._value()
        out[key] = _plain(value, (*path, key), unresolved)
    return out if isinstance(node, DictConfig) else list(out.values())


class _Wrong:
    """One pydantic error, at its place in the config: the keys that lead there (a union's
    member names dropped), the value found there, and what went wrong."""

    def __init__(self, err: dict[str, Any], values: Any) -> None:
        self.err, self.path, self.value, self.values = err, (), values, values
        for part in err["loc"]:
            if isinstance(self.value, dict) and part in self.value:
                self.value = self.value[part]
            elif isinstance(self.value, list) and isinstance(part, int) and part < len(self.value):
                self.value = self.value[part]
            elif err["type"] in ("missing", "extra_forbidden") and part == err["loc"][-1]:
                self.value = None
            else:
                continue  # a union member's tag, not a key
            self.path = (*self.path, part)

    def value_at(self, path: tuple[Any, ...]) -> Any:
        value = self.values
        for part in path:
            value = value[part]
        return value

    def under(self, unresolved: list[tuple[Any, ...]]) -> bool:
        return any(self.path[: len(u)] == u for u in unresolved)

    def key(self) -> str:
        return _key(self.path)

    def text(self, schema: dict[str, Any]) -> str:
        kind, key = self.err["type"], self.key()
        if kind == "cifarkit":
            return self.err["ctx"]["text"]
        if kind == "extra_forbidden":
            parent = _member(_schema_at(schema, self.path[:-1], self.values), self.value_at(self.path[:-1]), schema)
            options = _shown(", ".join(parent.get("properties", {}))) if parent else ""
            where = _key(self.path[:-1]) or "the config"
            return f"{key} is not an option; {where} takes {options}" if options else f"{key} is not an option"
        allowed = _schema_at(schema, self.path, self.values)
        want = _words(allowed, schema) if allowed else self.err["msg"].lower()
        if kind == "missing":
            return f"{key} is not set; pass {key}=... ({want})"
        return f"{key}={_shown(self.value)}: must be {want}"


def _line(wrong: list[_Wrong], schema: dict[str, Any]) -> str:
    """The first error in full; the keys of any others after it."""
    others = list(dict.fromkeys(w.key() for w in wrong[1:] if w.key() != wrong[0].key()))
    more = f" (and {len(others)} more: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
    return shown(wrong[0].text(schema)) + more


def _key(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 100 else text[:100] + "..."


def _deref(s: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in s:
        s = {**root["$defs"][s["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in s.items() if k != "$ref"}}
    return s


def _member(s: dict[str, Any] | None, value: Any, root: dict[str, Any], key: Any = None) -> dict[str, Any] | None:
    """Of a union's members, the one whose shape ``value`` has: for a mapping, the one that fits
    its keys best among those that have ``key``."""
    if s is None:
        return None
    members = _members(s, root)
    if isinstance(value, dict) or key is not None and not isinstance(key, int):
        objects = [m for m in members if m.get("type") == "object"]
        objects = [m for m in objects if key is None or key in m.get("properties", {})] or objects
        given = set(value) if isinstance(value, dict) else set()

        def fit(m: dict[str, Any]) -> int:
            return len(given & set(m.get("properties", {}))) - len(set(m.get("required", [])) - given)

        return max(objects, key=fit, default=None)
    if isinstance(value, list) or isinstance(key, int):
        return next((m for m in members if m.get("type") == "array"), None)
    return None


def _members(s: dict[str, Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    """A union's members, nested unions flattened; a schema that is no union is its own one member."""
    s = _deref(s, root)
    inner = s.get("anyOf", s.get("oneOf"))
    return [m for member in inner for m in _members(member, root)] if inner else [s]


def _schema_at(root: dict[str, Any], path: tuple[Any, ...], values: Any) -> dict[str, Any] | None:
    """The schema of the value at ``path``, found along the config's own values."""
    s: dict[str, Any] | None = root
    for part in path:
        container = _member(s, values, root, part)
        if container is None:
            return None
        if isinstance(part, int):
            s, values = container.get("items"), values[part] if isinstance(values, list) else None
        else:
            extra = container.get("additionalProperties")
            s = container.get("properties", {}).get(part) or (extra if isinstance(extra, dict) else None)
            values = values.get(part) if isinstance(values, dict) else None
    return _deref(s, root) if s is not None else None


def _words(s: dict[str, Any], root: dict[str, Any]) -> str:
    """What a schema allows, in words: ``an integer of at least 1``, ``one of text, json``."""
    s = _deref(s, root)
    if "description" in s and s.get("type") != "object":  # a field's own words, not a class's docstring
        return s["description"]
    if "anyOf" in s or "oneOf" in s:
        members = _members(s, root)
        null = any(m.get("type") == "null" for m in members)
        text = " or ".join(dict.fromkeys(_words(m, root) for m in members if m.get("type") != "null"))
        return f"{text}, or null" if null else text
    if "const" in s:
        return _shown(s["const"])
    if "enum" in s:
        return "one of " + ", ".join(dict.fromkeys(_shown(v) for v in s["enum"]))
    kind = s.get("type")
    if kind in ("integer", "number"):
        return ("an integer" if kind == "integer" else "a number") + _bounds(s)
    if kind == "boolean":
        return "true or false"
    if kind == "array":
        lo, hi = s.get("minItems"), s.get("maxItems")
        size = f" of {lo}" if lo is not None and lo == hi else f" of at least {lo}" if lo else ""
        items = f" ({_words(s['items'], root)} each)" if s.get("items") else ""
        return f"a list{size}{items}"
    if kind == "object":
        keys = list(s.get("properties", {}))
        keys = ["_target_"] if "_target_" in keys else keys  # a class's keyword arguments are its own
        return (
            f"a mapping with {', '.join(keys)}"
            if keys
            else "a non-empty mapping"
            if s.get("minProperties")
            else "a mapping"
        )
    return "a string" if kind == "string" else "a value"


def _bounds(s: dict[str, Any]) -> str:
    lo = ("at least", s["minimum"]) if "minimum" in s else ("over", s.get("exclusiveMinimum"))
    hi = ("at most", s["maximum"]) if "maximum" in s else ("below", s.get("exclusiveMaximum"))
    if lo[1] is not None and hi[1] is not None and lo[0] == "at least" and hi[0] == "at most":
        return f" from {lo[1]:g} to {hi[1]:g}"
    parts = [f"{word} {bound:g}" for word, bound in (lo, hi) if bound is not None]
    if not parts:
        return ""
    return (" of " if parts[0].startswith("at ") else " ") + " and ".join(parts)
