"""Starting from learnt weights: timm's weights from a file (and refused files, and no network),
another run's checkpoint (init_from), the net's own input size, fine-tuning head first, and the
data options for little data (a class subset, a number of training images per class)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.data.images import normalize
from cifarkit.data.sources import CIFAR10_CLASSES, CIFAR100_FINE
from cifarkit.nets.models import AirbenchNet, TimmNet, resize_batch
from cifarkit.nets.saved import SavedNet
from conftest import FAST, Payload, add_callback, craft_checkpoint, datamodule, error_line, folder_overrides, run_dirs

needs_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason='timm is an optional extra: pip install -e ".[timm]"'
)
TIMM_NET = "resnet10t"  # timm's smallest ResNet: a pretrained config (input 176 px) and weights named like its hub's


def timm_args(image_folder: Path, tmp_path: Path, *more: str) -> list[str]:
    """One training step of resnet10t on the tiny folder, its run under tmp_path/logs."""
    return [
        *FAST,
        *folder_overrides(image_folder, tmp_path),
        f"paths.log_dir={tmp_path / 'logs'}",
        "model=timm",
        f"model.net.name={TIMM_NET}",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        *more,
    ]


@needs_timm
def test_a_weights_file_gives_that_nets_outputs_and_its_checkpoint_needs_no_file(
    image_folder: Path, tmp_path: Path, main, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A safetensors file of a timm net, written here, is loaded through timm's path: the trained
    run started from exactly that net (every tensor but the new 3-class head, its features equal
    on the same input), fed at the pretrained size with the pretrained mean/std; its checkpoint
    rebuilds without the file."""
    import lightning as L
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    source = timm.create_model(TIMM_NET, pretrained=False).eval()
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen["state"] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
            seen["mean"] = trainer.datamodule.mean

    add_callback(monkeypatch, Capture())
    r = main("train.py", timm_args(image_folder, tmp_path, f"model.net.weights={tmp_path / 'weights.safetensors'}"))
    assert r.code == 0, r.err[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    assert (
        f"started from timm's {TIMM_NET} ({tmp_path / 'weights.safetensors'}): 84 of 86 tensors loaded; new: "
        "model.fc.bias, model.fc.weight" in (run / "train.log").read_text()
    )
    state = seen["state"]
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[f"model.{key}"], value), key
    assert state["model.fc.weight"].shape == (3, 512)
    assert seen["mean"] == list(timm.models.get_pretrained_cfg(TIMM_NET).mean)
    x = torch.randn(2, 3, 32, 32)
    net = TimmNet(TIMM_NET, num_classes=3, image_size=32, cifar_stem=False, input_size=176)
    net.load_state_dict(state)
    with torch.no_grad():
        up = torch.nn.functional.interpolate(x, size=176, mode="bilinear")
        torch.testing.assert_close(
            net.eval().model.forward_head(net.model.forward_features(up), pre_logits=True),
            source.forward_head(source.forward_features(up), pre_logits=True),
            rtol=0,
            atol=0,
        )

    (tmp_path / "weights.safetensors").unlink()  # the checkpoint is the net's weights: no file, no download
    saved = SavedNet.read(run / "checkpoints" / "last.ckpt")
    assert saved.net_config == {
        "_target_": "cifarkit.nets.models.TimmNet",
        "name": TIMM_NET,
        "cifar_stem": False,
        "image_size": 32,
        "input_size": 176,
    }
    assert saved.data.mean == seen["mean"]
    rebuilt = saved.rebuild(["cifarkit."])
    with torch.no_grad():
        assert rebuilt(x).shape == (2, 3)


@needs_timm
def test_a_pickle_weights_file_is_refused_and_runs_nothing(image_folder: Path, tmp_path: Path, main) -> None:
    torch.save({"conv1.weight": Payload(tmp_path / "canary")}, tmp_path / "weights.pth")
    r = main("train.py", timm_args(image_folder, tmp_path, f"model.net.weights={tmp_path / 'weights.pth'}"))
    assert r.code == 1
    line = error_line(r.err)
    assert "model.net.weights=" in line and "is not a readable weights file (UnpicklingError)" in line, line
    assert not (tmp_path / "canary").exists()


@needs_timm
def test_pretrained_without_a_network_is_one_line(image_folder: Path, tmp_path: Path, main, monkeypatch) -> None:
    """No hub reachable (and an empty cache): one line that names the file option."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = main("train.py", timm_args(image_folder, tmp_path, "model.net.pretrained=true"))
    assert r.code == 1
    line = error_line(r.err)
    assert f"timm could not load {TIMM_NET}'s pretrained weights" in line and "model.net.weights=<file>" in line, line


def airbench_weights(num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = AirbenchNet(num_classes=num_classes, widths=[8, 16, 16])
    net(torch.randn(4, 3, 32, 32))  # moves the BatchNorm statistics
    return net.state_dict()


def test_init_from_100_classes_to_10_loads_every_tensor_but_the_head(tmp_path: Path, compose_cfg, caplog) -> None:
    """A CIFAR-100 run's checkpoint starts a CIFAR-10 net: every tensor is the checkpoint's but the
    head, which is new (10 rows, untouched by the 100-class one); the log says which."""
    weights = airbench_weights(100, seed=0)
    info = {"classes": CIFAR100_FINE, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    net_cfg = {"_target_": "cifarkit.nets.models.AirbenchNet", "widths": [8, 16, 16]}
    ckpt = craft_checkpoint(
        tmp_path / "c100.ckpt",
        net_cfg,
        weights,
        data_info=info,
        hyper_parameters={"net": net_cfg, "classes": CIFAR100_FINE},
    )
    cfg = compose_cfg(["model=airbench", "model.net.widths=[8,16,16]", f"model.init_from={ckpt}"])
    model = instantiate(cfg.model, classes=CIFAR10_CLASSES)
    fresh_head = model.net.head.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="cifarkit.nets.start"):
        model.setup("fit")
    state = model.net.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        if key != "head.weight":
            assert torch.equal(state[key], value), key
    assert state["head.weight"].shape == (10, 16) and torch.equal(state["head.weight"], fresh_head)
    assert (
        f"started from model.init_from={ckpt}: {len(weights) - 1} of {len(weights)} tensors loaded; new: head.weight"
        in caplog.text
    )


def test_init_from_the_same_classes_keeps_the_head_and_another_net_is_one_line(tmp_path: Path, compose_cfg) -> None:
    weights = airbench_weights(3, seed=1)
    net_cfg = {"_target_": "cifarkit.nets.models.AirbenchNet", "widths": [8, 16, 16]}
    ckpt = craft_checkpoint(tmp_path / "c3.ckpt", net_cfg, weights)
    model = instantiate(
        compose_cfg(["model=airbench", "model.net.widths=[8,16,16]", f"model.init_from={ckpt}"]).model,
        classes=["cat", "dog", "frog"],
    )
    model.setup("fit")
    assert torch.equal(model.net.head.weight, weights["head.weight"])  # the same classes: the head is loaded too

    other = instantiate(
        compose_cfg(["model=airbench", "model.net.widths=[8,32,16]", f"model.init_from={ckpt}"]).model,
        classes=["cat", "dog", "frog"],
    )
    with pytest.raises(
        UserError,
        match=(
            r"does not fit this net \(\d+ tensors differ: .*groups.1.conv1.weight is \(16, "
            r"8, 3, 3\) there, \(32, 8, 3, 3\) here"
        ),
    ):
        other.setup("fit")
    with pytest.raises(InstantiationException, match="model.init_from=.*nothing.ckpt does not exist"):
        instantiate(
            compose_cfg(["model=airbench", f"model.init_from={tmp_path / 'nothing.ckpt'}"]).model, classes=["a", "b"]
        )


def test_init_from_a_pickle_payload_runs_nothing(tmp_path: Path, compose_cfg) -> None:
    torch.save({"state_dict": {"net.head.weight": Payload(tmp_path / "canary")}}, tmp_path / "evil.ckpt")
    model = instantiate(
        compose_cfg(["model=airbench", f"model.init_from={tmp_path / 'evil.ckpt'}"]).model, classes=["a", "b"]
    )
    with pytest.raises(UserError, match=r"model.init_from=.*evil.ckpt is not a readable checkpoint"):
        model.setup("fit")
    assert not (tmp_path / "canary").exists()


@needs_timm
def test_batches_are_resized_on_the_device_as_pil_resizes_a_file() -> None:
    """TimmNet's input_size: each batch upsampled inside forward equals PIL's bilinear resize of
    the same images (within one level: PIL computes in fixed point and rounds to uint8), and
    torch's own resize exactly."""
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])
    net = TimmNet(TIMM_NET, num_classes=3, image_size=32, cifar_stem=False, input_size=80).eval()
    fed = []
    net.model.register_forward_pre_hook(lambda module, args: fed.append(args[0]))
    with torch.no_grad():
        net(normalize(images, mean, std))
    (x,) = fed
    assert x.shape == (4, 3, 80, 80)
    pil = np.stack(
        [np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize((80, 80), Image.BILINEAR)) for im in images]
    )
    reference = normalize(torch.from_numpy(pil).permute(0, 3, 1, 2), mean, std)
    assert ((x - reference) * std[:, None, None] * 255).abs().max() <= 1 + 1e-3
    torch.testing.assert_close(
        x, torch.nn.functional.interpolate(normalize(images, mean, std), size=(80, 80), mode="bilinear")
    )
    assert resize_batch(x, 80) is x  # already the size: untouched


def test_class_subset_and_per_class_counts_are_exact(image_folder: Path, tmp_path: Path) -> None:
    """data.classes keeps those classes' images, relabelled in its order; data.train_per_class
    keeps exactly that many training images of each, seeded (another split seed, others)."""
    full = datamodule(tmp_path, [*folder_overrides(image_folder, tmp_path), "data.val_size=0"])
    full.setup()
    sub = datamodule(
        tmp_path, [*folder_overrides(image_folder, tmp_path), "data.val_size=0", "data.classes=[frog,cat]"]
    )
    sub.setup()
    assert sub.classes == ["frog", "cat"] and sub.data_info().classes == ["frog", "cat"]
    for split in ("train", "test"):
        x, y = full.splits[split]
        (sx, sy), expected = sub.splits[split], []
        for new, old in ((0, 2), (1, 0)):  # frog was 2, cat 0
            expected += [(img.numpy().tobytes(), new) for img in x[y == old]]
        assert sorted((img.numpy().tobytes(), int(label)) for img, label in zip(sx, sy)) == sorted(expected)

    def per_class(*more: str) -> torch.Tensor:
        dm = datamodule(tmp_path, [*folder_overrides(image_folder, tmp_path), "data.train_per_class=5", *more])
        dm.setup()
        x, y = dm.splits["train"]
        assert (
            torch.bincount(y).tolist() == [5, 5, 5] and len(dm.splits["val"][1]) == 12
        )  # the validation split as before
        return x

    first = per_class()
    assert torch.equal(first, per_class()) and not torch.equal(first, per_class("data.split_seed=1"))
    with pytest.raises(UserError, match=r"data.train_per_class=99, but class 'cat' has \d+ training images"):
        datamodule(tmp_path, [*folder_overrides(image_folder, tmp_path), "data.train_per_class=99"]).setup()
    with pytest.raises(
        UserError, match=r"data.classes names 'zebra', not a class of this data; pick from cat, dog, frog"
    ):
        _ = datamodule(tmp_path, [*folder_overrides(image_folder, tmp_path), "data.classes=[cat,zebra]"]).classes


def test_finetune_trains_the_head_alone_first_then_the_body_slower(
    image_folder: Path, tmp_path: Path, compose_cfg, monkeypatch
) -> None:
    """experiment=finetune from another run's checkpoint: for the first 20% of the steps only the
    head moves, then the body too, in its own param groups at a tenth of the head's lr."""
    import lightning as L

    from cifarkit.run.jobs import train_job

    net_cfg = {"_target_": "cifarkit.nets.models.AirbenchNet", "widths": [8, 16, 16]}
    ckpt = craft_checkpoint(
        tmp_path / "start.ckpt",
        net_cfg,
        airbench_weights(2, seed=2),
        hyper_parameters={"net": net_cfg, "classes": ["ant", "bee"]},
        data_info={"classes": ["ant", "bee"], "mean": [0.4] * 3, "std": [0.2] * 3, "image_size": 32},
    )
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.net.named_parameters()}

        def on_train_start(self, trainer, pl_module) -> None:
            seen["lrs"] = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}

    add_callback(monkeypatch, Watch())
    train_job(
        compose_cfg(
            [
                *FAST,
                *folder_overrides(image_folder, tmp_path),
                "experiment=finetune",
                "model=airbench",
                "model.net.widths=[8,16,16]",
                f"model.init_from={ckpt}",
                "trainer.max_steps=10",
                "trainer.max_epochs=-1",
            ]
        )
    )

    def moved(a: int, b: int, head: bool) -> list[str]:
        return [k for k in seen[a] if (k == "head.weight") == head and not torch.equal(seen[a][k], seen[b][k])]

    assert moved(0, 2, head=True) and not moved(0, 2, head=False)  # steps 0 and 1: the head alone
    assert moved(2, 9, head=False)  # from step 2 (20% of 10) the body too
    assert seen["lrs"]["weights"] == pytest.approx(10 * seen["lrs"]["weights/body"])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 10
