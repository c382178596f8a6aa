"""The nets: airbench's and ResNet-18's sizes, whitening, weights that survive a rebuild, one
training step; timm's nets behind TimmNet: families, CIFAR stems, bad options, trusted rebuilds."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from cifarkit.core.errors import UserError
from cifarkit.data.images import load_image, normalize
from cifarkit.nets.models import AirbenchNet, ResNet18, TimmNet
from cifarkit.nets.saved import SavedNet, build_net
from cifarkit.run.jobs import train_job
from conftest import FAST, Payload, add_callback, craft_checkpoint, error_line, folder_overrides, run_dirs

NETS = [AirbenchNet, ResNet18]


def correlated_images(n: int = 16, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Blurred noise with mixed channels and an offset: neighbouring pixels and channels correlate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size + 2, size + 2, generator=g)
    x = F.avg_pool2d(x, kernel_size=3, stride=1) + 0.3 * torch.randn(n, 3, size, size, generator=g)
    mix = torch.tensor([[1.0, 0.6, 0.2], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    return torch.einsum("dc,nchw->ndhw", mix, x) + 0.5


def test_parameter_counts() -> None:
    airbench = AirbenchNet()
    assert sum(p.numel() for p in airbench.parameters()) == 1_972_792
    # Frozen: the whitening weights (24*3*2*2) and the BatchNorm scales (2 * (64 + 256 + 256)).
    assert sum(p.numel() for p in airbench.parameters() if not p.requires_grad) == 288 + 1152
    assert sum(p.numel() for p in ResNet18().parameters()) == 11_173_962


@pytest.mark.parametrize("net_class", NETS)
def test_output_shapes(net_class: type[nn.Module]) -> None:
    x = torch.randn(2, 3, 32, 32)
    assert net_class()(x).shape == (2, 10)
    assert net_class(num_classes=3)(x).shape == (2, 3)


def test_init_from_images_whitens() -> None:
    images = correlated_images()
    net = AirbenchNet()
    net.init_from_images(images)
    weight = net.whiten.weight
    assert not weight.requires_grad
    assert torch.equal(weight[12:], -weight[:12])
    # The 12 positive filters' outputs on these images: unit variance, uncorrelated.
    out = F.conv2d(images, weight[:12]).transpose(0, 1).reshape(12, -1)
    cov = torch.cov(out.double())
    assert torch.allclose(cov.diagonal(), torch.ones(12, dtype=torch.float64), atol=0.02)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-4
    # Before, the same images were far from white.
    raw = F.unfold(images, 2).transpose(1, 2).reshape(-1, 12).T
    assert (torch.cov(raw.double()) - torch.eye(12)).abs().max() > 0.3

    # The same images give the same filters: again, from another random start, in other chunks.
    first = weight.clone()
    net.init_from_images(images)
    assert torch.equal(net.whiten.weight, first)
    torch.manual_seed(1)
    other = AirbenchNet()
    other.init_from_images(images, chunk=5)
    torch.testing.assert_close(other.whiten.weight, first)

    # Frozen through training: no gradient reaches the whitening weight.
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert net.whiten.weight.grad is None and net.whiten.bias.grad is not None


def test_init_from_images_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match="N, 3, H, W"):
        AirbenchNet().init_from_images(torch.randn(4, 1, 8, 8))


@pytest.mark.parametrize("net_class", NETS)
def test_state_dict_round_trip(net_class: type[nn.Module]) -> None:
    torch.manual_seed(0)
    trained = net_class(num_classes=4)
    if isinstance(trained, AirbenchNet):
        trained.init_from_images(correlated_images())
    trained(torch.randn(4, 3, 16, 16))  # training mode: moves the BatchNorm running statistics
    state = trained.state_dict()
    if isinstance(trained, AirbenchNet):
        assert "whiten.weight" in state  # a rebuilt net gets its whitening from the checkpoint
    torch.manual_seed(1)
    rebuilt = net_class(num_classes=4)
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(rebuilt.eval()(x), trained.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("model", ["airbench", "resnet18"])
def test_trusted_rebuild_accepts_the_config(model: str, compose_cfg) -> None:
    """The net node train.py saves in a checkpoint passes the trust rules and rebuilds the net."""
    net_cfg = OmegaConf.to_container(compose_cfg([f"model={model}"]).model.net, resolve=True)
    net = build_net(net_cfg, 10, ["cifarkit."])
    assert type(net).__name__ == net_cfg["_target_"].rpartition(".")[2]
    assert build_net({"_target_": net_cfg["_target_"]}, 3, ["cifarkit."])(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.slow  # airbench's run: test_train_whitens_airbench_from_the_training_split
@pytest.mark.parametrize("model", ["airbench", "resnet18"])
def test_one_batch_trains(model: str, image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + [f"model={model}", "debug=fdr"])
    train_job(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 1


def test_train_whitens_airbench_from_the_training_split(
    image_folder: Path, compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    """train() hands AirbenchNet its training images before the first step: the first layer's
    positive filters then decorrelate the training split's 2x2 patches."""
    import lightning as L

    seen: dict[str, torch.Tensor] = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            dm = trainer.datamodule
            seen["weight"] = pl_module.net.whiten.weight.detach().clone()
            seen["images"] = normalize(dm.splits["train"][0], torch.tensor(dm.mean), torch.tensor(dm.std))

    add_callback(monkeypatch, Capture())
    train_job(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["model=airbench", "debug=fdr"]))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["status"] == "completed"
    w = seen["weight"]
    assert torch.equal(w[12:], -w[:12]) and not torch.equal(w, AirbenchNet().whiten.weight)
    out = torch.nn.functional.conv2d(seen["images"].double(), w[:12].double())  # (N, 12, 31, 31)
    cov = torch.cov(out.transpose(0, 1).reshape(12, -1))
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=0.05)


# ---------------------------------------------------------------------------------------------
# Nets from timm (cifarkit.nets.models.TimmNet).

needs_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason='timm is an optional extra: pip install -e ".[timm]"'
)


@needs_timm
@pytest.mark.parametrize(
    "name,cifar_stem,features",  # the last feature map's side on 32x32 images
    [
        ("resnet18", True, 4),
        ("resnet18", False, 1),
        ("resnet10t", True, 4),
        ("vit_tiny_patch16_224", True, None),
        ("mobilenetv3_small_050", False, 1),
    ],
)
def test_timm_families_build_for_32px_images(name: str, cifar_stem: bool, features: int | None) -> None:
    """Each family builds with the data's class count and takes 32x32 images; the CIFAR stems are as documented."""
    net = TimmNet(name, num_classes=7, image_size=32, cifar_stem=cifar_stem)
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 7) and net.training
    if features is not None:  # a ResNet's CIFAR stem keeps 4x the resolution per side: 4x4 at the end, not 1x1
        assert net.model.forward_features(x).shape[-2:] == (features, features)
    if name.startswith("resnet") and cifar_stem:  # resnet10t's deep stem too
        assert net.model.conv1.kernel_size == (3, 3) and net.model.conv1.stride == (1, 1)
        assert isinstance(net.model.maxpool, nn.Identity)
    if name.startswith("vit"):  # 4-pixel patches at the data's size: 64 tokens
        assert net.model.patch_embed.patch_size == (4, 4) and net.model.patch_embed.num_patches == 64


@needs_timm
@pytest.mark.parametrize(
    "args,message",
    [
        ({"name": "os.system"}, r"model.net.name='os.system' is not a timm model; .*timm.list_models\(\)"),
        ({"name": "resnet18.a1_in1k"}, "is not a timm model"),  # a pretrained tag: nothing pretrained here
        ({"name": "resnet18", "pretrained": True}, r"model.net.pretrained is an option of timm's factory"),
        (
            {"name": "resnet18", "checkpoint_path": "weights.pth"},
            r"model.net.checkpoint_path is an option of timm's factory",
        ),
        (
            {"name": "convnext_atto", "cifar_stem": True},
            r"cifar_stem=true: convnext_atto .*set model.net.cifar_stem=false",
        ),
        ({"name": "vit_tiny_patch16_224"}, r"does not take 32x32 images .*cifar_stem=true for a ViT"),
    ],
)
def test_timm_bad_options_are_one_line(args: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        TimmNet(**{"num_classes": 3, "image_size": 32, "cifar_stem": False, **args})
    assert "\n" not in str(e.value)


@pytest.mark.slow  # a timm run and its rebuilds; test_finetune's timm weights test stays in the default suite
@needs_timm
def test_timm_trains_and_its_checkpoint_rebuilds_in_eval_and_predict(image_folder: Path, tmp_path: Path, main) -> None:
    """One batch of model=timm, then eval.py and predict.py rebuild the net from the checkpoint
    under the trust rules and give the trained net's own outputs."""
    data = folder_overrides(image_folder, tmp_path) + [f"paths.log_dir={tmp_path / 'logs'}"]
    r = main(
        "train.py",
        FAST
        + data
        + [
            "model=timm",
            "model.net.name=resnet10t",
            "+trainer.limit_train_batches=1",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
        ],
    )
    assert r.code == 0, r.err[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    assert json.loads((run / "metrics.json").read_text())["steps"] == 1
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = SavedNet.read(ckpt)
    assert saved.net_config == {
        "_target_": "cifarkit.nets.models.TimmNet",
        "name": "resnet10t",
        "cifar_stem": True,
        "image_size": 32,
    }
    net = saved.rebuild(["cifarkit."])
    assert isinstance(net, TimmNet) and torch.equal(
        net.state_dict()["model.conv1.weight"], saved.weights["model.conv1.weight"]
    )

    r = main("eval.py", ["trainer=cpu", f"ckpt_path={ckpt}", *data])
    assert r.code == 0, r.err[-3000:]
    image = next((image_folder / "test" / "dog").glob("*"))
    r = main(
        "predict.py", [f"ckpt_path={ckpt}", f"inputs={image}", "format=json", f"paths.log_dir={tmp_path / 'logs'}"]
    )
    assert r.code == 0, r.err[-3000:]
    (row,) = [json.loads(line) for line in r.out.splitlines()]
    x = torch.from_numpy(load_image(image, 32).copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = net(normalize(x, torch.tensor(saved.data.mean), torch.tensor(saved.data.std))).softmax(1)[0]
    assert [p for _, p in row["top"]] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-5)


def write_foreign_config(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text('{"architecture": "resnet18", "num_classes": 5}')


@needs_timm
def test_a_local_dir_name_is_live_without_the_check(tmp_path: Path) -> None:
    """The witness: timm itself honours a ``local-dir:`` name, building what a foreign file says."""
    import timm

    write_foreign_config(tmp_path / "evil")
    assert timm.create_model(f"local-dir:{tmp_path / 'evil'}", pretrained=False).num_classes == 5


HOSTILE_NAMES = {
    "dotted_path": "os.system",
    "hub_config": "hf-hub:timm/resnet18.a1_in1k",  # timm would fetch a config from the Hugging Face hub
    "local_config": "local-dir:{tmp}/evil",  # timm would read {tmp}/evil/config.json
    "interpolation": "${oc.create:{_target_: numpy.savetxt, _args_: ['{tmp}/canary', [1]]}}",
}


@needs_timm
@pytest.mark.parametrize("case", [*HOSTILE_NAMES, "factory_option"])
def test_crafted_timm_checkpoint_is_refused_before_timm_builds_anything(
    case: str, tmp_path: Path, main, monkeypatch
) -> None:
    """A checkpoint naming the trusted wrapper with a hostile ``name`` (or a factory option that
    loads a file) is refused in one line, and timm's factory is never called."""
    import timm

    calls: list[tuple] = []

    @functools.wraps(timm.create_model)  # its signature too: TimmNet reads the factory's options from it
    def spy(*args: Any, **kwargs: Any) -> None:
        calls.append(args)

    monkeypatch.setattr(timm, "create_model", spy)
    write_foreign_config(tmp_path / "evil")
    torch.save(Payload(tmp_path / "canary"), tmp_path / "payload.pt")  # what checkpoint_path would load
    net = {"_target_": "cifarkit.nets.models.TimmNet", "name": "resnet18", "image_size": 32, "cifar_stem": True}
    if case == "factory_option":
        net["checkpoint_path"] = str(tmp_path / "payload.pt")
    else:
        net["name"] = HOSTILE_NAMES[case].replace("{tmp}", str(tmp_path))
    ckpt = craft_checkpoint(tmp_path / "crafted.ckpt", net, {"model.fc.weight": torch.zeros(3, 512)})
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(image)
    r = main("predict.py", [f"ckpt_path={ckpt}", f"inputs={image}", f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 1 and r.out == ""
    last = error_line(r.err)
    expected = {
        "interpolation": "holds an interpolation",
        "factory_option": "model.net.checkpoint_path is an option of timm's factory",
    }
    assert expected.get(case, f"model.net.name={net['name']!r} is not a timm model") in last, last
    assert not calls and not (tmp_path / "canary").exists()
