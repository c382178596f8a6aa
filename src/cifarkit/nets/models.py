"""Networks. ``BasicCNN`` is the tutorial's BasicBlock CNN, layer for layer; ``AirbenchNet``
is airbench94's net; ``ResNet18`` is ResNet-18 with a stem for 32x32 images; ``TimmNet`` is
any timm net behind a wrapper defined here so the checkpoint trust rules judge it (its
pretrained weights are a start: cifarkit/nets/start.py)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarkit.core.errors import UserError
from cifarkit.core.extras import require


class BasicBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> MaxPool2d(2): halves the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, hidden_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden_dim, out_channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv2(self.relu(self.conv1(x)))))


class BasicCNN(nn.Module):
    """Three BasicBlocks (3->16->32, 32->64->128, 128->128->256) and fc 4096->2048->256->classes.

    9,457,962 parameters for 10 classes at 32x32. ``image_size`` only sets the first fc's
    input width (256 * (image_size / 8)^2), so larger images work without other changes.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2x2 poolings), got {image_size}")
        self.block1 = BasicBlock(3, 32, 16)
        self.block2 = BasicBlock(32, 128, 64)
        self.block3 = BasicBlock(128, 256, 128)
        self.fc1 = nn.Linear(256 * (image_size // 8) ** 2, 2048)
        self.fc2 = nn.Linear(2048, 256)
        self.fc3 = nn.Linear(256, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        x = torch.flatten(x, start_dim=1)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


# ---------------------------------------------------------------------------------------------
# airbench: Keller Jordan's fast CIFAR-10 net (github.com/KellerJordan/cifar10-airbench,
# legacy/airbench94.py; arXiv 2404.00498), rebuilt here as a plain nn.Module.

AIRBENCH_BN_EPS = 1e-12  # airbench's (PyTorch's default is 1e-5)


def _airbench_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm with airbench's settings: only the bias is trained; the scale stays at 1,
    as the conv that follows can scale its input itself."""
    norm = nn.BatchNorm2d(channels, eps=AIRBENCH_BN_EPS, momentum=momentum)
    norm.weight.requires_grad_(False)
    return norm


def _partial_identity_(conv: nn.Conv2d) -> None:
    """Make the conv's first ``in_channels`` filters copy their input channel (the rest keep
    their random init): the net starts close to passing the whitened image through, which
    airbench found trains faster than a fully random start."""
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: conv.in_channels])


class AirbenchConvGroup(nn.Module):
    """conv3x3 -> MaxPool2d(2) -> BN -> GELU -> conv3x3 -> BN -> GELU: halves the spatial size.

    Pooling straight after the first conv runs everything after it on a quarter of the pixels.
    """

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _airbench_norm(out_channels, bn_momentum)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = _airbench_norm(out_channels, bn_momentum)
        self.act = nn.GELU()
        _partial_identity_(self.conv1)
        _partial_identity_(self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """airbench94's net: a frozen 2x2 patch-whitening conv (3 -> 24), GELU, one
    ``AirbenchConvGroup`` per width, a global max pool and a bias-free linear head whose
    output is multiplied by ``scale``.

    1,972,792 parameters with the default widths (64, 256, 256) and 10 classes. Whitening makes
    the input's 2x2 patches uncorrelated with unit variance, so the first trained conv sees
    well-conditioned input; its filters come from the training images (``init_from_images``)
    or, for a rebuilt net, from the state dict, and are never trained. ``scale`` (airbench:
    1/9) keeps the initial logits small. ``bn_momentum`` is PyTorch's (weight of the new batch
    statistics): airbench's 0.6 for the old running value is 0.4 here; BatchNorm eps is 1e-12.
    The whitening bias is trained; airbench94's recipe freezes it after 3 epochs
    (``cifarkit.callbacks.FreezeParameters`` in ``experiment=airbench94``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (64, 256, 256),
        bn_momentum: float = 0.4,
        scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one conv group")
        # Two filters (v and -v) per eigenvector of the 12-dim patch covariance: the GELU that
        # follows would otherwise lose the negative half of each whitened component.
        self.whiten = nn.Conv2d(3, 2 * 3 * 2 * 2, kernel_size=2, bias=True)
        self.whiten.weight.requires_grad_(False)
        with torch.no_grad():
            self.whiten.bias.zero_()  # trained: shifts each whitened component before the GELU
        self.act = nn.GELU()
        channels = [self.whiten.out_channels, *widths]
        self.groups = nn.Sequential(*(AirbenchConvGroup(i, o, bn_momentum) for i, o in zip(channels, channels[1:])))
        self.head = nn.Linear(channels[-1], num_classes, bias=False)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act(self.whiten(x)))
        # Global max pool: airbench's MaxPool2d(3) on the 3x3 map left from 32x32, any size here.
        return self.head(x.amax(dim=(2, 3))) * self.scale

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor, eps: float = 5e-4, chunk: int = 256) -> None:
        """Set the frozen whitening filters from normalized training images (N, 3, H, W).

        Every 2x2 patch (12 values) is taken; the patches' covariance C = V diag(l) V^T gives
        the filters V / sqrt(l + eps) and their negatives, so each positive filter's outputs on
        these images have unit variance and are uncorrelated with the others. ``eps`` (airbench's
        5e-4) bounds the gain of near-constant directions. The sums run in float64 over chunks of
        ``chunk`` images (bounded memory), and each eigenvector's sign is fixed (its largest entry
        positive), so the same images always give the same filters.
        """
        if images.ndim != 4 or images.shape[1] != self.whiten.in_channels:
            raise ValueError(f"init_from_images needs images shaped (N, 3, H, W), got {tuple(images.shape)}")
        size = self.whiten.in_channels * self.whiten.kernel_size[0] * self.whiten.kernel_size[1]
        count, total, products = 0, torch.zeros(size, dtype=torch.float64), torch.zeros(size, size, dtype=torch.float64)
        for batch in images.detach().split(chunk):
            # (B, 12, L) -> (B*L, 12), each row one patch in the conv weight's (channel, row, column) order.
            patches = (
                F.unfold(batch.to("cpu", torch.float64), self.whiten.kernel_size).transpose(1, 2).reshape(-1, size)
            )
            count += len(patches)
            total += patches.sum(0)
            products += patches.T @ patches
        mean = total / count
        covariance = products / count - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(covariance)  # ascending; eigenvectors in columns
        values, vectors = values.flip(0), vectors.flip(1)
        largest = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
        vectors = vectors * torch.sign(largest)
        filters = (vectors / torch.sqrt(values.clamp(min=0) + eps)).T.reshape(size, *self.whiten.weight.shape[1:])
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.weight.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# ResNet-18 for 32x32 images, as in Lightning's CIFAR-10 baseline tutorial (torchvision's
# resnet18 with a 3x3 stride-1 stem and no max pool).


class ResidualBlock(nn.Module):
    """He et al.'s basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is the input itself, or a 1x1 conv + BN where the stride or width changes
    (the input must then be resized to be added).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with a CIFAR stem: 11,173,962 parameters for 10 classes.

    The stem is a 3x3 stride-1 conv (64) + BN + ReLU with no max pool: ImageNet's 7x7 stride-2
    conv and pool would shrink a 32x32 image to 8x8 before the first stage. Then four stages of
    two ``ResidualBlock`` (``widths``, default 64/128/256/512; stages 2-4 halve the size),
    average pooling and a linear head. Convs start as torchvision's (Kaiming normal, fan-out).
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"ResNet18 has four stages, so widths needs four numbers, got {list(widths)}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(ResidualBlock(in_channels, width, stride), ResidualBlock(width, width)))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, start_dim=1))


# ---------------------------------------------------------------------------------------------
# Nets from timm (an optional extra). The wrapper is defined here, so a checkpoint naming it is
# judged by the trust rules like the nets above (cifarkit/nets/saved.py); its arguments are
# plain data, checked below before timm builds anything.

VIT_MODULES = ("vision_transformer", "deit")  # timm's modules of VisionTransformer nets


def _timm() -> Any:
    return require("model=timm", "timm", "timm")


class TimmNet(nn.Module):
    """A timm net built with ``num_classes`` outputs and never with pretrained weights, so
    nothing is downloaded and a checkpoint rebuilds it from its own weights. Pretrained weights
    (``model.net.pretrained``, ``model.net.weights``) are loaded into it when a fit starts, by
    cifarkit/nets/start.py through timm's own loading path.

    ``name`` must be one of ``timm.list_models()`` as listed: no pretrained tag, no ``hf-hub:``
    or ``local-dir:`` source (which read a config from elsewhere). ``kwargs`` go to the net's
    own constructor (e.g. ``drop_path_rate``, ``img_size``); timm's factory options
    (``pretrained``, ``checkpoint_path``, ``cache_dir``, ...) are refused, since they load files.

    ``cifar_stem`` keeps 32x32 images from shrinking to a few pixels before the first stage:
    for timm's ResNet family (its ``ResNet`` class: resnet*, resnext*, seresnet*, ecaresnet*,
    wide_resnet*, resnest*, skresnet*, res2net*) a 3x3 stride-1 first conv and no max pool, as
    ``ResNet18`` above; for ViTs (timm's vision_transformer and deit modules) patches of 4
    pixels at ``image_size``. Other families have none here: use ``cifar_stem=false`` (and pass
    ``img_size`` to nets that fix their input size when built).

    ``input_size``: the side the net is fed at (a pretrained net's own, e.g. 224). Each batch of
    ``image_size`` images is resized to it inside ``forward``, on the device (bilinear, as PIL
    resizes a file), so neither the cache nor memory holds a large copy of the data, and a
    checkpoint's net resizes the same way in eval, predict, serve and export.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        image_size: int,
        cifar_stem: bool,
        input_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        timm = _timm()
        if not isinstance(name, str) or name not in timm.list_models():
            raise UserError(
                f"model.net.name={name!r} is not a timm model; list them with python -c 'import timm; "
                "print(timm.list_models())'"
            )
        factory = {
            *inspect.signature(timm.create_model).parameters,
            *inspect.signature(timm.models.build_model_with_cfg).parameters,
        }
        refused = sorted(k for k in kwargs if k in factory or k.startswith("pretrained"))
        if refused:
            raise UserError(
                f"model.net.{refused[0]} is an option of timm's factory, not of the net; TimmNet loads no weights or "
                "files (remove it)"
            )
        vit = timm.models.is_model_in_modules(name, VIT_MODULES)
        if cifar_stem and vit:
            kwargs = {"img_size": image_size, "patch_size": 4, **kwargs}
        self.input_size = input_size
        self.timm_kwargs = kwargs  # what timm's factory built it with: a pretrained copy is built the same way
        self.model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        if cifar_stem and not vit:
            if not isinstance(self.model, timm.models.resnet.ResNet):
                raise UserError(
                    f"model.net.cifar_stem=true: {name} ({type(self.model).__name__}) has no CIFAR stem here "
                    "(timm's ResNets and ViTs do); set model.net.cifar_stem=false"
                )
            width = self.model.bn1.num_features  # the stem's output width, deep stems included
            self.model.conv1 = nn.Conv2d(3, width, kernel_size=3, padding=1, bias=False)
            nn.init.kaiming_normal_(
                self.model.conv1.weight, mode="fan_out", nonlinearity="relu"
            )  # as timm starts its convs
            self.model.maxpool = nn.Identity()
        size = input_size or image_size
        try:  # one image through, so a net that cannot take the data's images says so now, in one line
            with torch.no_grad():
                self.model.eval()(torch.zeros(1, 3, size, size))
        except Exception as e:
            raise UserError(
                f"timm's {name} does not take {size}x{size} images ({str(e).splitlines()[0]}); "
                "set model.net.cifar_stem=true for a ViT, or pass the size it needs, e.g. +model.net.img_size=..."
            ) from e
        self.model.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(resize_batch(x, self.input_size))


def resize_batch(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """A batch (B, C, H, W) resized to ``size`` x ``size`` (as it is when None or already that
    size): bilinear with half-pixel centres, as PIL resizes, antialiased when shrinking."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(x.shape[-2:]))
