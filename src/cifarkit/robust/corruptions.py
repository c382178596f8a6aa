"""The 15 corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019) at 5 severities, batched in torch.

The parameters are those of the reference generator for CIFAR (hendrycks/robustness,
``ImageNet-C/create_c/make_cifar_c.py``); the code is this project's. Every random choice of an
image is drawn on the CPU from its own generator, seeded by (seed, image index, corruption,
severity), and moved to the device in one copy; the rest runs on whole batches on the device. So a
corrupted image depends on those four only, never on the batch it was made in.

Where this departs from the reference (docs/robustness.md, Fidelity, measures each):

* ``frost`` overlays generated textures (``frost_textures``: noise and ice needles, each scaled to
  the colour mean and spread of one of the reference's five photographs), not the photographs.
* ``motion_blur`` and ``snow`` compute ImageMagick's motion-blur kernel (a one-sided Gaussian
  along a line, edge pixels repeated) in torch instead of calling ImageMagick.
* ``glass_blur`` copies a neighbour into each pixel, as the reference's tuple "swap" of two
  NumPy views actually does.
* ``jpeg_compression`` uses torchvision's libjpeg encoder at the reference's qualities (CPU).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

GENERATOR = "cifar-c-1"  # changes whenever a corruption gives other pixels for the same inputs (the cache's key)
SEVERITIES = (1, 2, 3, 4, 5)

# Each corruption's parameters at severities 1-5 (the reference's CIFAR values).
PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [0.06, 0.11, 0.16, 0.21, 0.26],  # zoom factors 1, 1.01, ... below 1 + this
    "snow": [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}
CORRUPTIONS = tuple(PARAMS)

Draw = Callable[[Callable[[torch.Generator], torch.Tensor]], torch.Tensor]


def image_seed(seed: int, index: int, name: str, severity: int) -> int:
    """The generator seed of one corrupted image: each (seed, image, corruption, severity) its own."""
    digest = hashlib.blake2b(f"{seed}/{index}/{name}/{severity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def corrupt(images: torch.Tensor, name: str, severity: int, index: torch.Tensor, seed: int) -> torch.Tensor:
    """``images`` (uint8, B x 3 x H x W, on any device) under corruption ``name`` at ``severity``;
    ``index`` holds each image's number in its split, which with ``seed`` fixes its random draws."""
    gens = [torch.Generator().manual_seed(image_seed(seed, int(i), name, severity)) for i in index.tolist()]

    def draw(one: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        return torch.stack([one(g) for g in gens]).to(images.device)

    x = images.float() / 255
    out = _FUNCS[name](x, PARAMS[name][severity - 1], draw)
    return out.clamp(0, 1).mul(255).floor().to(torch.uint8)  # as the reference's np.uint8 of its floats


# ---------------------------------------------------------------------------------------------- helpers


def _extend(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Indices outside [0, n) brought inside: ``nearest`` (edge repeated), ``mirror`` (OpenCV's
    REFLECT_101: ``dcb|abcd|cba``) or ``reflect`` (SciPy's: ``cba|abcd|dcb``)."""
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "mirror":
        period = 2 * (n - 1)
        i = i.remainder(period)
        return torch.where(i >= n, period - i, i)
    i = i.remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _gaussian_1d(sigma: float, truncate: float) -> torch.Tensor:
    """SciPy's ``gaussian_filter1d`` weights: radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * t**2 / sigma**2) if sigma > 0 else (t == 0).double()
    return w / w.sum()


def _separable(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate the last two dimensions of ``x`` (B, C, H, W) with ``kernel`` along each, borders by ``mode``."""
    r = (len(kernel) - 1) // 2
    k = kernel.to(x)
    for dim in (-1, -2):
        n = x.shape[dim]
        idx = _extend(torch.arange(-r, n + r, device=x.device), n, mode)
        padded = x.index_select(dim, idx)
        x = sum(k[j] * padded.narrow(dim, j, n) for j in range(len(k)))
    return x


def _gaussian(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """scikit-image's ``gaussian`` (SciPy's filter per channel)."""
    return x if sigma <= 0 else _separable(x, _gaussian_1d(sigma, truncate), mode)


def _shift_sum(x: torch.Tensor, weights: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Sum over k of ``weights[k]`` times ``x`` read at (row + dy[b, k], col + dx[b, k]), edges repeated."""
    b, c, h, w = x.shape
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    flat = x.flatten(2)
    out = torch.zeros_like(x)
    for k in range(len(weights)):
        r = (rows[None, :] + dy[:, k : k + 1]).clamp(0, h - 1)
        q = (cols[None, :] + dx[:, k : k + 1]).clamp(0, w - 1)
        at = (r[:, :, None] * w + q[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        out += float(weights[k]) * flat.gather(2, at).view(b, c, h, w)
    return out


def _motion_blur(x: torch.Tensor, radius: float, sigma: float, angle: torch.Tensor) -> torch.Tensor:
    """ImageMagick 6's motion blur (``MotionBlurImage``): 2*ceil(radius)+1 taps of a one-sided Gaussian,
    tap i read at (round(i sin(angle)), round(i cos(angle))) rows and columns away (``angle`` in degrees,
    one per image; edge pixels repeated), then cut to 8 bits as the reference's PNG round trip gives it
    (both measured against ImageMagick 6.9.11 through Wand on impulse images)."""
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-(i**2) / (2 * max(sigma, 1e-12) ** 2))
    weights /= weights.sum()
    a = torch.deg2rad(angle.double().cpu())[:, None]
    dx = torch.ceil(i * torch.cos(a) - 0.5).long().to(x.device)
    dy = torch.ceil(i * torch.sin(a) - 0.5).long().to(x.device)
    return torch.floor(_shift_sum(x, weights, dy, dx) * 255 + 1e-4) / 255


def _linear_zoom(n: int, factor: float) -> torch.Tensor:
    """The (n, n) matrix of the reference's ``clipped_zoom`` along one axis: the centre ceil(n / factor)
    pixels stretched by ``factor`` with linear interpolation (SciPy's ``zoom``, order 1), centre n kept."""
    ch = math.ceil(n / factor)
    top = (n - ch) // 2
    out = round(ch * factor)
    trim = (out - n) // 2
    m = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n):
        pos = (trim + j) * (ch - 1) / (out - 1) if out > 1 else 0.0
        lo = min(int(math.floor(pos)), ch - 1)
        frac = pos - lo
        m[j, top + lo] += 1 - frac
        if frac > 0:
            m[j, top + lo + 1] += frac
    return m


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    mh, mw = _linear_zoom(h, factor).to(x), _linear_zoom(w, factor).to(x)
    return mh @ x @ mw.T


def _bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """``x`` (B, C, H, W) read at fractional (rows, cols) (B, H, W) by linear interpolation, the
    neighbours outside the image brought in by ``mode`` (``_extend``)."""
    b, c, h, w = x.shape
    r0, c0 = rows.floor(), cols.floor()
    fr, fc = (rows - r0)[:, None], (cols - c0)[:, None]
    r0, c0 = r0.long(), c0.long()
    flat = x.flatten(2)

    def at(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        idx = (_extend(r, h, mode) * w + _extend(q, w, mode)).view(b, 1, h * w).expand(b, c, h * w)
        return flat.gather(2, idx).view(b, c, h, w)

    top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
    bottom = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
    return top * (1 - fr) + bottom * fr


def _box_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Pillow's BOX resampling from n_in to n_out pixels as an (n_out, n_in) matrix."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        centre = (j + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        for i in range(lo, hi):
            t = (i - centre + 0.5) / max(scale, 1.0)
            m[j, i] = 1.0 if -0.5 < t <= 0.5 else 0.0
        m[j] /= m[j].sum()
    return m


def _resize_box(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pillow's ``resize(BOX)`` of 8-bit images: across, rounded, then down, rounded."""
    mw = _box_matrix(x.shape[-1], w).to(x)
    mh = _box_matrix(x.shape[-2], h).to(x)
    x = torch.floor((x @ mw.T) * 255 + 0.5) / 255
    return torch.floor((mh @ x) * 255 + 0.5) / 255


def _plasma(u: torch.Tensor, size: int, decay: float) -> torch.Tensor:
    """The diamond-square height maps of the reference's fog, one per row of ``u`` (B, 1023 uniforms
    for size 32), scaled to [0, 1]; float64."""
    b = len(u)
    m = torch.zeros(b, size, size, dtype=torch.float64)
    step, wibble, used = size, 100.0, 0

    def noisy(mean: torch.Tensor) -> torch.Tensor:
        nonlocal used
        n = mean[0].numel()
        noise = (2 * u[:, used : used + n] - 1).view_as(mean) * wibble
        used += n
        return mean / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corner = m[:, 0::step, 0::step]
        sq = corner + corner.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, half::step, half::step] = noisy(sq)
        dr, ul = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = noisy(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        m[:, half::step, 0::step] = noisy(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step, wibble = half, wibble / decay
    m -= m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def plasma_draws(size: int) -> int:
    """Uniforms one plasma map of side ``size`` (a power of two) takes."""
    return 3 * sum((size // s) ** 2 for s in (2**k for k in range(1, size.bit_length())) if s <= size)


# Per-channel mean and standard deviation (0-255) of the reference's five frost photographs after its
# 0.2 resize, which the generated textures are scaled to; with each one's size there.
FROST_STATS = [
    ((77.7, 149.1, 165.7), (22.6, 14.0, 13.0), (120, 180)),
    ((200.8, 205.4, 214.5), (17.4, 18.2, 18.7), (63, 112)),
    ((200.8, 205.4, 214.5), (17.4, 18.2, 18.7), (63, 112)),
    ((137.6, 152.8, 165.2), (21.0, 21.0, 22.5), (70, 105)),
    ((112.4, 123.4, 134.7), (36.5, 35.1, 33.3), (99, 132)),
]


@lru_cache(maxsize=4)
def frost_textures(min_side: int = 32) -> tuple[torch.Tensor, ...]:
    """Five frost textures (3, H, W) in 0-255, generated from a fixed seed: smooth noise at several
    scales plus bright thin ice needles at random angles, each scaled per channel to one reference
    photograph's mean and spread (``FROST_STATS``); at least ``min_side`` + 1 pixels a side."""
    g = torch.Generator().manual_seed(20190101)
    textures = []
    for mean, std, (h, w) in FROST_STATS:
        h, w = max(h, min_side + 1), max(w, min_side + 1)
        field = torch.zeros(1, 1, h, w, dtype=torch.float64)
        for scale in (2, 4, 8, 16):
            coarse = torch.rand(1, 1, -(-h // scale) + 1, -(-w // scale) + 1, generator=g, dtype=torch.float64)
            field += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * scale / 16
        needles = torch.zeros(h, w, dtype=torch.float64)
        for _ in range(h * w // 40):
            y0, x0 = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
            angle = float(torch.rand(1, generator=g)) * math.pi
            length = 3 + float(torch.rand(1, generator=g)) * 12
            t = torch.linspace(0, length, int(length) * 2 + 1, dtype=torch.float64)
            ys = (y0 + t * math.sin(angle)).long().clamp(0, h - 1)
            xs = (x0 + t * math.cos(angle)).long().clamp(0, w - 1)
            needles[ys, xs] += 0.5 + float(torch.rand(1, generator=g))
        gray = field[0, 0] + F.avg_pool2d(needles[None, None], 3, 1, 1, count_include_pad=False)[0, 0] * 2 + needles
        gray = (gray - gray.mean()) / gray.std()
        rgb = torch.stack([gray * s + m for m, s in zip(mean, std)])
        textures.append(rgb.clamp(0, 255).round())
    return tuple(textures)


# ---------------------------------------------------------------------------------------------- corruptions
# Each takes x (B, 3, H, W) float in [0, 1] on the device, its parameters and ``draw``, and returns
# the corrupted batch (clipped and quantized by ``corrupt``).


def _gaussian_noise(x: torch.Tensor, c: float, draw: Draw) -> torch.Tensor:
    return x + c * draw(lambda g: torch.randn(x.shape[1:], generator=g))


def _shot_noise(x: torch.Tensor, c: float, draw: Draw) -> torch.Tensor:
    rates = iter((x.cpu().double() * c).unbind())
    return draw(lambda g: torch.poisson(next(rates), generator=g)).float() / c


def _impulse_noise(x: torch.Tensor, c: float, draw: Draw) -> torch.Tensor:
    u = draw(lambda g: torch.rand((2, *x.shape[1:]), generator=g))
    return torch.where(u[:, 0] < c, (u[:, 1] < 0.5).float(), x)


def _defocus_blur(x: torch.Tensor, c: tuple, draw: Draw) -> torch.Tensor:
    radius, alias_blur = c
    r = 8 if radius <= 8 else math.ceil(radius)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk /= disk.sum()
    g = torch.exp(-(torch.arange(-1, 2, dtype=torch.float64) ** 2) / (2 * alias_blur**2))  # OpenCV's 3x3 blur
    kernel = _separable(disk[None, None], g / g.sum(), "mirror")[0, 0].to(x)
    idx_h = _extend(torch.arange(-r, x.shape[-2] + r, device=x.device), x.shape[-2], "mirror")
    idx_w = _extend(torch.arange(-r, x.shape[-1] + r, device=x.device), x.shape[-1], "mirror")
    padded = x[:, :, idx_h][:, :, :, idx_w]
    return F.conv2d(padded, kernel.expand(3, 1, -1, -1).contiguous(), groups=3)


def _glass_blur(x: torch.Tensor, c: tuple, draw: Draw) -> torch.Tensor:
    sigma, delta, iterations = c
    b, _, h, w = x.shape
    x = torch.floor(_gaussian(x, sigma) * 255) / 255  # the reference's np.uint8
    rows, cols = list(range(h - delta, delta, -1)), list(range(w - delta, delta, -1))
    shifts = draw(lambda g: torch.randint(-delta, delta, (iterations, len(rows), len(cols), 2), generator=g))
    batch = torch.arange(b, device=x.device)
    for it in range(iterations):
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                dx, dy = shifts[:, it, i, j, 0], shifts[:, it, i, j, 1]
                x[batch, :, row, col] = x[batch, :, row + dy, col + dx]
    return _gaussian(x, sigma)


def _motion(x: torch.Tensor, c: tuple, draw: Draw) -> torch.Tensor:
    angle = draw(lambda g: torch.rand((), generator=g, dtype=torch.float64) * 90 - 45)
    return _motion_blur(x, c[0], c[1], angle)


def _zoom_blur(x: torch.Tensor, c: float, draw: Draw) -> torch.Tensor:
    factors = np.arange(1, 1 + c, 0.01)
    out = sum(_zoom(x, float(z)) for z in factors)
    return (x + out) / (len(factors) + 1)


def _snow(x: torch.Tensor, c: tuple, draw: Draw) -> torch.Tensor:
    loc, scale, zoom, threshold, radius, sigma, keep = c
    h, w = x.shape[-2:]
    flakes = draw(lambda g: torch.randn((1, h, w), generator=g, dtype=torch.float64) * scale + loc)
    angle = draw(lambda g: torch.rand((), generator=g, dtype=torch.float64) * 90 - 135)
    flakes = _zoom(flakes.to(x), zoom)
    flakes = torch.where(flakes < threshold, 0.0, flakes)
    flakes = torch.floor(flakes.clamp(0, 1) * 255) / 255  # an 8-bit grey image, as the reference writes it
    flakes = _motion_blur(flakes, radius, sigma, angle)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    x = keep * x + (1 - keep) * torch.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + flakes.flip(-1, -2)


def _frost(x: torch.Tensor, c: tuple, draw: Draw) -> torch.Tensor:
    h, w = x.shape[-2:]
    textures = frost_textures(max(h, w))

    def crop(g: torch.Generator) -> torch.Tensor:
        t = textures[int(torch.randint(0, len(textures), (), generator=g))]
        y0 = int(torch.randint(0, t.shape[1] - h, (), generator=g))
        x0 = int(torch.randint(0, t.shape[2] - w, (), generator=g))
        return t[:, y0 : y0 + h, x0 : x0 + w]

    frost = draw(crop).to(x)
    return (c[0] * x * 255 + c[1] * frost) / 255


def _fog(x: torch.Tensor, c: tuple, draw: Draw) -> torch.Tensor:
    h, w = x.shape[-2:]
    size = 1 << (max(h, w, 2) - 1).bit_length()  # the reference's map side, a power of two
    u = draw(lambda g: torch.rand(plasma_draws(size), generator=g, dtype=torch.float64)).cpu()
    fog = _plasma(u, size, c[1])[:, None, :h, :w].to(x)
    top = x.amax((1, 2, 3), keepdim=True)
    return (x + c[0] * fog) * top / (top + c[0])


def _brightness(x: torch.Tensor, c: float, draw: Draw) -> torch.Tensor:
    v = x.amax(1, keepdim=True)  # HSV's value; raising it scales the pixel (hue, saturation kept)
    raised = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * raised / v.clamp_min(1e-12), raised)


def _contrast(x: torch.Tensor, c: float, draw: Draw) -> torch.Tensor:
    means = x.mean((2, 3), keepdim=True)
    return (x - means) * c + means


def _elastic(x: torch.Tensor, c: tuple, draw: Draw) -> torch.Tensor:
    b, _, h, w = x.shape
    side = min(h, w)
    alpha, sigma, shift = (v * side for v in c)
    centre = torch.tensor([h // 2, w // 2], dtype=torch.float64)
    sq = side // 3
    src = torch.stack([centre + sq, torch.stack([centre[0] + sq, centre[1] - sq]), centre - sq])  # (x, y) points
    moved = src + draw(lambda g: (torch.rand((3, 2), generator=g, dtype=torch.float64) * 2 - 1) * shift).cpu()
    # The affine map from each moved point back to its source: where each output pixel reads.
    ones = torch.ones(b, 3, 1, dtype=torch.float64)
    back = torch.linalg.solve(torch.cat([moved, ones], 2), src.expand(b, 3, 2))  # (B, 3, 2)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    read = (grid @ back).view(b, h, w, 2).to(x.device)
    x = _bilinear(x, read[..., 1].to(x), read[..., 0].to(x), "mirror")
    fields = draw(lambda g: torch.rand((2, 1, h, w), generator=g, dtype=torch.float64) * 2 - 1)
    if alpha == 0:
        return x
    dxy = _gaussian(fields.flatten(0, 1)[:, None].double(), sigma, "reflect", truncate=3).view(b, 2, h, w) * alpha
    dxy = dxy.to(x)
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None] + dxy[:, 1]
    cols = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :] + dxy[:, 0]
    return _bilinear(x, rows, cols, "reflect")


def _pixelate(x: torch.Tensor, c: float, draw: Draw) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = _resize_box(x, int(h * c), int(w * c))
    return _resize_box(small, h, w)


def _jpeg(x: torch.Tensor, c: int, draw: Draw) -> torch.Tensor:
    images = list(torch.round(x * 255).to(torch.uint8).cpu().unbind())
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs (TorchCodec has no JPEG encoder)
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(encode_jpeg(images, quality=c))
    return torch.stack(decoded).to(x.device).float() / 255


_FUNCS: dict[str, Callable[[torch.Tensor, object, Draw], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg,
}
