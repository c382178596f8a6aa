"""Training augmentation as steps named in YAML, run on whole batches on the training device.

``data.augment`` maps step names to their options (null turns a step off; every option is
given, as configs/data/common/pipeline.yaml gives the tutorial's; cifarkit/run/schema.py holds them
to their types and bounds); the steps always run in this order, whatever order the YAML lists:

* ``crop: {padding: 4, mode: zeros}``: torchvision's ``RandomCrop(size, padding, padding_mode)``
  with ``mode`` ``zeros`` (its ``constant`` 0) or ``reflect`` (airbench's "translate").
* ``flip: {p: 0.5}``: ``RandomHorizontalFlip(p)``, drawn per image and epoch.
* ``alternating_flip: {}``: airbench's flip: each image gets one random orientation in epoch 0
  and the other one in every odd epoch, so it is seen both ways every two epochs.
* ``cutout: {size: 16}``: DeVries & Taylor's cutout: a ``size`` x ``size`` square (clipped at
  the border) around a uniformly drawn pixel is set to 0 after normalization, the mean pixel.
* ``augmix: {width: 3, depth: 0, severity: 3, views: 2}``: AugMix (Hendrycks et al., ICLR 2020)
  after the crop and flip: ``width`` chains of ``depth`` ops (0: 1 to 3, drawn per chain) among
  autocontrast, equalize, posterize, solarize, rotate, shear and translate (none of them a CIFAR-10-C
  corruption), at ``severity`` (of 10), mixed with Dirichlet(1) weights and blended with the image by a
  Beta(1, 1) weight. ``views: 0`` trains on the mixed image; ``views: 2`` yields the image and two
  mixes of it as (B, 3, C, H, W) for the Jensen-Shannon consistency loss (``model.consistency``).

``TTA`` / ``tta_logits``: the test-time views (``model.tta``), averaged as airbench averages them.

Every random choice is drawn on the CPU from a generator the loader seeds with (seed, epoch,
rank) and then moved to the device in one copy; ``apply`` and ``erase`` are a few batched
tensor ops with no Python loop over images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

PADDING_MODES = {"zeros": "constant", "reflect": "reflect"}  # ours -> torchvision's padding_mode


def mixed_seed(seed: int, n: int) -> int:
    """The generator seed of draw ``n`` (an epoch, a stream) of a run seeded ``seed``: each pair its own."""
    return seed * 100_003 + n


@dataclass(frozen=True)
class Augment:
    """The training augmentation of one run, built from ``data.augment`` by ``from_steps``."""

    padding: int = 0
    padding_mode: str = "zeros"
    flip_p: float = 0.0
    alternating_flip: bool = False
    cutout: int = 0
    augmix: tuple[int, int, int, int] = (0, 0, 0, 0)  # width, depth, severity, views; width 0: off

    @classmethod
    def from_steps(cls, steps: Mapping[str, Any]) -> Augment:
        """The steps (checked by cifarkit/run/schema.py) as one ``Augment``."""
        steps = {k: v for k, v in steps.items() if v is not None}
        crop, flip, cutout = steps.get("crop"), steps.get("flip"), steps.get("cutout")
        mode = crop["mode"] if crop is not None else "zeros"
        padding = int(crop["padding"]) if crop is not None else 0
        size = int(cutout["size"]) if cutout is not None else 0
        p = float(flip["p"]) if flip is not None else 0.0
        mix = steps.get("augmix")
        augmix = (int(mix["width"]), int(mix["depth"]), int(mix["severity"]), int(mix["views"])) if mix else (0,) * 4
        return cls(padding, mode, p, "alternating_flip" in steps, size, augmix)

    def __bool__(self) -> bool:
        return bool(self.padding or self.flip_p or self.alternating_flip or self.cutout or self.augmix[0])

    def draw(
        self, idx: torch.Tensor, n_images: int, size: tuple[int, int], epoch: int, seed: int, g: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Everything random for the images ``idx`` (of ``n_images``, each ``size``) in one
        epoch, on the CPU. The crop offsets and the flips
        come from ``g`` (seeded by seed, epoch and rank); an alternating flip's first orientation
        depends on the seed and the image only, so every rank and epoch agrees on it."""
        m = len(idx)
        d = {
            "dy": torch.randint(0, 2 * self.padding + 1, (m,), generator=g),
            "dx": torch.randint(0, 2 * self.padding + 1, (m,), generator=g),
            "flip": torch.rand(m, generator=g) < self.flip_p,
        }
        if self.alternating_flip:
            first = torch.Generator().manual_seed(mixed_seed(seed, 99_991))
            d["flip"] = (torch.rand(n_images, generator=first) < 0.5)[idx] ^ bool(epoch % 2)
        if self.cutout:
            d["cy"] = torch.randint(0, size[0], (m,), generator=g)
            d["cx"] = torch.randint(0, size[1], (m,), generator=g)
        if self.augmix[0]:
            d |= augmix_draw(m, self.augmix, g)
        return d

    def apply(self, images: torch.Tensor, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Crop and flip a uint8 batch (B, C, H, W) for the draws ``d``."""
        if not (self.padding or self.flip_p or self.alternating_flip):
            return images
        return crop_flip(images, self.padding, d["dy"], d["dx"], d["flip"], self.padding_mode)

    def erase(self, x: torch.Tensor, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Cut out each image's square from a normalized batch (in place)."""
        if not self.cutout:
            return x
        h, w = x.shape[-2:]
        lo_y, lo_x = d["cy"] - self.cutout // 2, d["cx"] - self.cutout // 2
        rows = torch.arange(h, device=x.device)[None, :] - lo_y[:, None]  # (B, H): inside when in [0, size)
        cols = torch.arange(w, device=x.device)[None, :] - lo_x[:, None]
        inside = ((rows >= 0) & (rows < self.cutout))[:, None, :, None] & ((cols >= 0) & (cols < self.cutout))[
            :, None, None, :
        ]
        return x.masked_fill_(inside, 0.0)

    def views(self, images: torch.Tensor, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The uint8 batch (B, C, H, W) as floats in [0, 1]: AugMix's mix of each image (no views), or the
        image and its ``views`` mixes (B, 1 + views, C, H, W); without AugMix, the image."""
        x = images.float() / 255
        width, depth, severity, views = self.augmix
        if not width:
            return x
        mixes = [augmix(x, d, v, severity) for v in range(max(views, 1))]
        return mixes[0] if not views else torch.stack([x, *mixes], 1)

    def pil_steps(self, image_size: int) -> list[Any]:
        """The per-sample torchvision transforms of the same steps (the torchvision pipeline, which
        has neither alternating_flip nor cutout: the schema refuses them there)."""
        steps: list[Any] = []
        if self.padding:
            steps.append(T.RandomCrop(image_size, padding=self.padding, padding_mode=PADDING_MODES[self.padding_mode]))
        if self.flip_p:
            steps.append(T.RandomHorizontalFlip(self.flip_p))
        return steps


AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x",
              "translate_y")  # fmt: skip
CHAIN_MAX = 3  # ops in a chain when the depth is drawn


def augmix_draw(m: int, setting: tuple[int, int, int, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    """AugMix's choices for ``m`` images and each of its views (at least one): the chains' Dirichlet(1)
    weights, the Beta(1, 1) blend, each chain step's op (-1: past the chain's depth), level and sign."""
    width, depth, _, views = setting
    v = max(views, 1)
    weights = -torch.rand(m, v, width, generator=g).clamp_min(1e-12).log()  # Dirichlet(1): normalized Exp(1)
    steps = CHAIN_MAX if depth <= 0 else depth
    ops = torch.randint(0, len(AUGMIX_OPS), (m, v, width, steps), generator=g)
    if depth <= 0:
        n = torch.randint(1, CHAIN_MAX + 1, (m, v, width, 1), generator=g)
        ops = torch.where(torch.arange(steps) < n, ops, -1)
    return {
        "am_w": weights / weights.sum(-1, keepdim=True),
        "am_m": torch.rand(m, v, generator=g),
        "am_op": ops,
        "am_level": torch.rand(m, v, width, steps, generator=g),
        "am_sign": torch.randint(0, 2, (m, v, width, steps), generator=g) * 2 - 1,
    }


def _augmix_op(x: torch.Tensor, op: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One AugMix op on floats in [0, 1] (B, C, H, W), each image at its own level (AugMix's: uniform
    in [0.1, severity] of 10, given here as a fraction of 10) and sign."""
    b, _, h, w = x.shape
    lv = level[:, None, None, None]
    if op == "autocontrast":
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)
    if op == "equalize":
        return TF.equalize((x * 255).round().to(torch.uint8)).float() / 255
    if op == "posterize":
        shift = (8 - (4 - (lv * 4).long())).to(torch.uint8)  # keep 4 - int(level * 4) bits
        v = (x * 255).round().to(torch.uint8)
        return ((v >> shift) << shift).float() / 255
    if op == "solarize":
        threshold = (256 - (lv * 256).long()).float() / 255
        return torch.where(x >= threshold, 1 - x, x)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    s = sign.to(x.dtype)
    if op == "rotate":
        a = torch.deg2rad((level * 30).floor() * s)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    elif op == "shear_x":
        theta[:, 0, 1] = level * 0.3 * s
    elif op == "shear_y":
        theta[:, 1, 0] = level * 0.3 * s
    elif op == "translate_x":
        theta[:, 0, 2] = (level * w / 3).floor() * s * 2 / w
    else:
        theta[:, 1, 2] = (level * h / 3).floor() * s * 2 / h
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augmix(x: torch.Tensor, d: Mapping[str, torch.Tensor], view: int, severity: int) -> torch.Tensor:
    """View ``view`` of AugMix on floats in [0, 1] (B, C, H, W) for the draws ``d``: each image's chains,
    each op applied to the images whose step chose it, mixed and blended with the image."""
    weights, ops = d["am_w"][:, view], d["am_op"][:, view]
    levels = 0.1 + d["am_level"][:, view] * (severity - 0.1)  # of 10, as AugMix's sample_level
    mix = torch.zeros_like(x)
    for j in range(weights.shape[1]):
        chain = x.clone()
        for k in range(ops.shape[2]):
            for o, name in enumerate(AUGMIX_OPS):
                chose = ops[:, j, k] == o
                if bool(chose.any()):
                    lv, sg = levels[chose, j, k] / 10, d["am_sign"][chose, view, j, k]
                    chain[chose] = _augmix_op(chain[chose], name, lv, sg)
        mix += weights[:, j, None, None, None] * chain
    m = d["am_m"][:, view, None, None, None]
    return m * x + (1 - m) * mix


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in [-(n-1), 2n-2] into [0, n) as reflect padding does (the edge not repeated)."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def crop_flip(
    images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, mode: str = "zeros"
) -> torch.Tensor:
    """Crop each image at offset (dy, dx) of its padded copy, then mirror where ``flip``.

    Equals torchvision's ``RandomCrop(H, padding, padding_mode)`` followed by
    ``RandomHorizontalFlip`` for the same offsets and flips, for a whole uint8 batch at once:
    the source pixel of every output pixel is computed (reflected, or marked as padding) and
    fetched with one gather, so no padded copy is made.
    """
    b, c, h, w = images.shape
    rows = dy[:, None] - padding + torch.arange(h, device=images.device)  # (B, H), may fall in the padding
    ar_w = torch.arange(w, device=images.device)
    cols = dx[:, None] - padding + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
    if mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    # One gather along the flattened pixels, shared by the channels (cheaper than indexing all four dimensions).
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    out = images.flatten(2).gather(2, flat).view(b, c, h, w)
    return out if mode == "reflect" else out * inside[:, None].to(out.dtype)


TTA = ("none", "flip", "flip_translate")


def tta_logits(forward: Any, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits of ``x`` (B, C, H, W) averaged over cheap views, as airbench tests: ``flip`` the
    image and its mirror; ``flip_translate`` half that, half the same on the image shifted one
    pixel up-left and one pixel down-right (reflect padding)."""
    if tta == "none":
        return forward(x)

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (forward(v) + forward(v.flip(-1)))

    if tta == "flip":
        return mirrored(x)
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:]))
    return 0.5 * mirrored(x) + 0.5 * shifted
