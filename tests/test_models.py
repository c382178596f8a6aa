"""The airbench and ResNet-18 nets: sizes, whitening, weights that survive a rebuild, one training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, add_callback, folder_overrides
from omegaconf import OmegaConf
from torch import nn

from cifarkit.checkpoints import build_net
from cifarkit.images import normalize
from cifarkit.model import AirbenchNet, ResNet18
from cifarkit.train import train

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
    train(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 1


def test_train_whitens_airbench_from_the_training_split(image_folder: Path, compose_cfg, tmp_path: Path, monkeypatch) -> None:
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
    train(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["model=airbench", "debug=fdr"]))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["status"] == "completed"
    w = seen["weight"]
    assert torch.equal(w[12:], -w[:12]) and not torch.equal(w, AirbenchNet().whiten.weight)
    out = torch.nn.functional.conv2d(seen["images"].double(), w[:12].double())  # (N, 12, 31, 31)
    cov = torch.cov(out.transpose(0, 1).reshape(12, -1))
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=0.05)
