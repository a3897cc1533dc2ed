"""Offline, unlimited training images for the tiny priors: dead leaves + crops of bundled photos.

Everything here is torch-only and vectorised; batches are drawn on the training device from a
`torch.Generator` that lives on that device, so the same seed on the same device gives the same
images. Images are (B, 3, S, S) float32 in [-1, 1].

Image split (fixed; see `HELD_OUT_IMAGE_NAMES` and `TRAINING_IMAGE_NAMES`):

- Held out, never trained on (the evaluation images, `data=embedded`): scikit-image `astronaut`,
  `chelsea`, `coffee`, `rocket`. `load_image` refuses them unless `allow_held_out=True`, which only
  evaluation code passes.
- Training, RGB: scikit-image `hubble_deep_field`, `immunohistochemistry`, `retina`, both views of
  `stereo_motorcycle`; scikit-learn `load_sample_images()` `flower` and `china`.
- Training, grey (used as 3-channel grey): scikit-image `camera`, `moon`, `coins`, `brick`,
  `grass`, `gravel`; and the 200 faces of `skimage.data.lfw_subset()` (25 px, upscaled).

Crops use random scales (log-uniform between 1 source pixel per output pixel and the whole image),
flips and 90-degree rotations; large scales read from an area-averaged image pyramid so the crops do
not alias. The dead-leaves model (Lee, Mumford & Huang 2001) draws occluding discs, ellipses and
rectangles with radii ~ r^-3 (scale invariant) and colours taken from training-image pixels, with
flat, gradient, grating or noise texture inside, anti-aliased edges, a slight blur and noise.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from g2d2.data import EVAL_IMAGE_NAMES

#: the evaluation images (data=embedded): never used for training
HELD_OUT_IMAGE_NAMES = EVAL_IMAGE_NAMES
#: RGB training photos
TRAINING_RGB_NAMES: tuple[str, ...] = (
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
    "flower",
    "china",
)
#: grey training photos (used as 3-channel grey)
TRAINING_GREY_NAMES: tuple[str, ...] = ("camera", "moon", "coins", "brick", "grass", "gravel")
#: pseudo-name of the 200 lfw_subset faces
FACES_NAME = "lfw_faces"
TRAINING_IMAGE_NAMES: tuple[str, ...] = TRAINING_RGB_NAMES + TRAINING_GREY_NAMES + (FACES_NAME,)


def load_image(name: str, allow_held_out: bool = False) -> np.ndarray:
    """One bundled photo as (H, W, 3) uint8 (grey ones repeated to 3 channels).

    Args:
        name: one of `TRAINING_RGB_NAMES`, `TRAINING_GREY_NAMES` or `HELD_OUT_IMAGE_NAMES`.
        allow_held_out: must be True to load an evaluation image (evaluation code only).
    Raises:
        ValueError: a held-out name without `allow_held_out`, or an unknown name.
    """
    if name in HELD_OUT_IMAGE_NAMES and not allow_held_out:
        raise ValueError(
            f"'{name}' is a held-out evaluation image and must never be used for training "
            f"(held out: {HELD_OUT_IMAGE_NAMES}); pass allow_held_out=True only for evaluation"
        )
    return _load_raw(name).copy()


@functools.cache
def _load_raw(name: str) -> np.ndarray:
    from skimage import data

    if name in HELD_OUT_IMAGE_NAMES:
        img = getattr(data, name)()
    elif name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    elif name in ("flower", "china"):
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        idx = [i for i, f in enumerate(sample.filenames) if f.endswith(f"{name}.jpg")][0]
        img = sample.images[idx]
    elif name in TRAINING_RGB_NAMES or name in TRAINING_GREY_NAMES:
        img = getattr(data, name)()
    else:
        raise ValueError(
            f"unknown image '{name}'; choose from {TRAINING_RGB_NAMES + TRAINING_GREY_NAMES} "
            f"(training) or {HELD_OUT_IMAGE_NAMES} (held out)"
        )
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def load_faces(size: int) -> torch.Tensor:
    """The 200 lfw_subset faces, bicubically upscaled to (200, 3, size, size) in [-1, 1]."""
    from skimage import data

    faces = torch.from_numpy(np.asarray(data.lfw_subset(), dtype=np.float32))[:, None]  # (200, 1, 25, 25)
    faces = F.interpolate(faces, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (faces * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]


class ImageBank:
    """Photos (and their area-averaged pyramids) packed on one device for batched random crops.

    Args:
        images: list of (3, H, W) tensors in [-1, 1] (any sizes, each side >= `size`).
        weights: sampling weight of each image (normalised here).
        size: output crop side S.
        device: where the pixels live and the crops are made.
        min_scale: smallest source pixels per output pixel (1 = native resolution).
    """

    def __init__(self, images: list[torch.Tensor], weights: list[float], size: int,
                 device: torch.device | str = "cpu", min_scale: float = 1.0):
        self.size = size
        self.device = torch.device(device)
        self.min_scale = min_scale
        chunks, offsets, heights, widths, nlev, minside = [], [], [], [], [], []
        total = 0
        for img in images:
            if min(img.shape[-2:]) < size:
                raise ValueError(f"image of shape {tuple(img.shape)} is smaller than the crop size {size}")
            lev, offs, hs, ws = img, [], [], []
            while True:
                offs.append(total)
                hs.append(lev.shape[-2])
                ws.append(lev.shape[-1])
                chunks.append(lev.reshape(3, -1))
                total += lev.shape[-2] * lev.shape[-1]
                if min(lev.shape[-2:]) < 2 * size:
                    break
                lev = F.avg_pool2d(lev[None], 2)[0]
            offsets.append(offs)
            heights.append(hs)
            widths.append(ws)
            nlev.append(len(offs))
            minside.append(min(img.shape[-2:]))
        nmax = max(nlev)

        def table(rows: list[list[int]]) -> torch.Tensor:
            padded = [r + [r[-1]] * (nmax - len(r)) for r in rows]
            return torch.tensor(padded, dtype=torch.long, device=self.device)

        self.pixels = torch.cat(chunks, dim=1).to(self.device)  # (3, P)
        # (n_img, nmax) each: where level l of image i starts in `pixels`, and its size
        self.offsets, self.heights, self.widths = table(offsets), table(heights), table(widths)
        self.num_levels = torch.tensor(nlev, device=self.device)
        self.min_side = torch.tensor(minside, dtype=torch.float32, device=self.device)
        w = torch.tensor(weights, dtype=torch.float32)
        self.weights = (w / w.sum()).to(self.device)
        grid = torch.arange(size, dtype=torch.float32, device=self.device) + 0.5
        self._grid_y, self._grid_x = torch.meshgrid(grid, grid, indexing="ij")  # (S, S) pixel centres

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n random crops (random image, scale, position, flip, 90-degree rotation): (n, 3, S, S)."""
        dev, s = self.device, self.size
        img = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        u = torch.rand(n, 5, generator=generator, device=dev)
        fmax = self.min_side[img] / s
        fmin = torch.minimum(torch.full_like(fmax, self.min_scale), fmax)
        # source pixels per output pixel, log-uniform in [fmin, fmax]
        f = torch.exp(torch.log(fmin) + u[:, 0] * (torch.log(fmax) - torch.log(fmin)))
        level = torch.minimum(torch.floor(torch.log2(f.clamp(min=1.0))).long(), self.num_levels[img] - 1)
        h0 = self.heights[img, 0].float()
        w0 = self.widths[img, 0].float()
        y0 = u[:, 1] * (h0 - s * f).clamp(min=0)  # top-left corner, level-0 pixels
        x0 = u[:, 2] * (w0 - s * f).clamp(min=0)
        # dihedral augmentation on the output grid: transpose, then flip each axis
        dih = torch.randint(0, 8, (n,), generator=generator, device=dev)
        gy, gx = self._grid_y.expand(n, s, s), self._grid_x.expand(n, s, s)
        transpose = (dih & 1).bool()[:, None, None]
        gy, gx = torch.where(transpose, gx, gy), torch.where(transpose, gy, gx)
        gy = torch.where((dih & 2).bool()[:, None, None], s - gy, gy)
        gx = torch.where((dih & 4).bool()[:, None, None], s - gx, gx)
        # continuous level-0 coordinates -> index coordinates of the chosen pyramid level
        scale = torch.exp2(level.float())[:, None, None]
        yy = (y0[:, None, None] + gy * f[:, None, None]) / scale - 0.5
        xx = (x0[:, None, None] + gx * f[:, None, None]) / scale - 0.5
        return self._bilinear(img, level, yy, xx)

    def _bilinear(self, img: torch.Tensor, level: torch.Tensor, yy: torch.Tensor,
                  xx: torch.Tensor) -> torch.Tensor:
        hl = self.heights[img, level][:, None, None]
        wl = self.widths[img, level][:, None, None]
        off = self.offsets[img, level][:, None, None]
        yy = torch.minimum(yy.clamp(min=0), (hl - 1).float())
        xx = torch.minimum(xx.clamp(min=0), (wl - 1).float())
        y0, x0 = yy.floor().long(), xx.floor().long()
        y1, x1 = torch.minimum(y0 + 1, hl - 1), torch.minimum(x0 + 1, wl - 1)
        wy, wx = (yy - y0).unsqueeze(1), (xx - x0).unsqueeze(1)  # (n, 1, S, S)

        def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            idx = (off + y * wl + x).reshape(-1)
            return self.pixels[:, idx].reshape(3, *y.shape).transpose(0, 1)  # (n, 3, S, S)

        top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
        bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
        return (top * (1 - wy) + bottom * wy).contiguous()

    def palette(self, n: int, generator: torch.Generator, num_images: int | None = None) -> torch.Tensor:
        """n colours (n, 3) from random pixels of random images (by weight; only the first
        `num_images` images when given, e.g. the RGB ones)."""
        weights = self.weights if num_images is None else self.weights[:num_images]
        img = torch.multinomial(weights, n, replacement=True, generator=generator)
        u = torch.rand(n, 2, generator=generator, device=self.device)
        lev = self.num_levels[img] - 1
        y = (u[:, 0] * self.heights[img, lev]).long()
        x = (u[:, 1] * self.widths[img, lev]).long()
        return self.pixels[:, self.offsets[img, lev] + y * self.widths[img, lev] + x].T.contiguous()


@functools.cache
def training_bank(size: int, device: torch.device | str = "cpu", grey_weight: float = 0.2,
                  faces_weight: float = 0.1) -> ImageBank:
    """The training photos (never the held-out ones) as an `ImageBank` (cached per arguments; the
    bank is read-only).

    RGB photos share weight 1 - grey_weight - faces_weight equally, grey photos share `grey_weight`,
    the 200 faces share `faces_weight`.
    """
    rgb_weight = 1.0 - grey_weight - faces_weight
    if rgb_weight <= 0 or grey_weight < 0 or faces_weight < 0:
        raise ValueError(
            f"need grey_weight, faces_weight >= 0 with sum < 1, got {grey_weight}, {faces_weight}"
        )
    images = [_to_tensor(load_image(n)) for n in TRAINING_RGB_NAMES + TRAINING_GREY_NAMES]
    weights = [rgb_weight / len(TRAINING_RGB_NAMES)] * len(TRAINING_RGB_NAMES)
    weights += [grey_weight / len(TRAINING_GREY_NAMES)] * len(TRAINING_GREY_NAMES)
    if faces_weight > 0:
        faces = list(load_faces(size))
        images += faces
        weights += [faces_weight / len(faces)] * len(faces)
    return ImageBank(images, weights, size, device)


def held_out_crops(num: int, size: int, seed: int = 1234) -> torch.Tensor:
    """Fixed random crops of the held-out evaluation images (CPU), for held-out metrics only.

    Same sampler as training (random scale, position, flips); the same (num, size, seed) always
    gives the same crops. Returns (num, 3, size, size) in [-1, 1].
    """
    return _held_out_crops(num, size, seed).clone()


@functools.cache
def _held_out_crops(num: int, size: int, seed: int) -> torch.Tensor:
    images = [_to_tensor(load_image(n, allow_held_out=True)) for n in HELD_OUT_IMAGE_NAMES]
    bank = ImageBank(images, [1.0] * len(images), size, "cpu")
    return bank.sample(num, torch.Generator().manual_seed(seed))


def held_out_whole_images(size: int) -> torch.Tensor:
    """The held-out images, centre-cropped to a square and area-resized: (4, 3, size, size)."""
    out = []
    for name in HELD_OUT_IMAGE_NAMES:
        x = _to_tensor(load_image(name, allow_held_out=True))
        side = min(x.shape[-2:])
        top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
        x = x[:, top:top + side, left:left + side]
        out.append(F.interpolate(x[None], size=(size, size), mode="area")[0])
    return torch.stack(out)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Per-image separable Gaussian blur; x (n, C, S, S), sigma (n,) in pixels (0 = identity)."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (taps[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*C, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


class _Draws:
    """The random draws of `dead_leaves` from one generator: uniforms, and colours from a palette (or uniform)."""

    def __init__(self, generator: torch.Generator, palette: torch.Tensor | None) -> None:
        self.generator, self.palette, self.device = generator, palette, generator.device

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device)

    def colours(self, *shape: int) -> torch.Tensor:
        """(*shape, 3) colours in [-1, 1]."""
        if self.palette is None:
            return self.rand(*shape, 3) * 2 - 1
        idx = torch.randint(0, self.palette.shape[0], shape, generator=self.generator, device=self.device)
        return self.palette[idx]


def _gradient_background(draw: _Draws, n: int, size: int, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S): a linear gradient between two colours in a random direction."""
    ang = draw.rand(n, 1, 1) * 2 * math.pi
    ramp = ((xx - size / 2) * torch.cos(ang) + (yy - size / 2) * torch.sin(ang)) / size + 0.5  # (n, S, S)
    c0, c1 = draw.colours(n), draw.colours(n)
    return c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * ramp[:, None]


def _texture_field(draw: _Draws, n: int, size: int) -> torch.Tensor:
    """(n, 1, S, S): one smooth noise field per image, shared by its noise-textured shapes."""
    tex = F.interpolate(draw.randn(n, 1, 8, 8), size=(size, size), mode="bicubic", align_corners=False)
    return tex + 0.5 * F.interpolate(draw.randn(n, 1, 32, 32), size=(size, size), mode="bilinear",
                                     align_corners=False)


def _leaf_shapes(draw: _Draws, n: int, k: int, size: int, rmin: float, rmax: float) -> dict[str, torch.Tensor]:
    """The parameters of k shapes per image, (n, k) each (colours (n, k, 3)); radii by inverse CDF of
    p(r) ~ r^-3 on [rmin, rmax]; texture type: flat < .4 <= gradient < .7 <= grating < .85 <= noise."""
    r = (rmin ** -2 - draw.rand(n, k) * (rmin ** -2 - rmax ** -2)) ** -0.5
    cy, cx = draw.rand(n, k) * (size + 16) - 8, draw.rand(n, k) * (size + 16) - 8
    elong = torch.exp((draw.rand(n, k) - 0.5) * 1.2)
    theta = draw.rand(n, k) * math.pi
    is_rect = draw.rand(n, k) < 0.35
    base = draw.colours(n, k)
    kind = draw.rand(n, k)
    grad = (draw.colours(n, k) - base) * (kind >= 0.4)[..., None] * (kind < 0.7)[..., None]
    grad_dir = draw.rand(n, k) * 2 * math.pi
    grating = (0.05 + 0.25 * draw.rand(n, k)) * ((kind >= 0.7) & (kind < 0.85))
    grating_freq = 0.05 + 0.3 * draw.rand(n, k)  # cycles per pixel
    grating_phase = draw.rand(n, k) * 2 * math.pi
    noise_amp = (0.05 + 0.3 * draw.rand(n, k)) * (kind >= 0.85)
    return dict(r=r, cy=cy, cx=cx, ax_a=r * elong, ax_b=r / elong, theta=theta, is_rect=is_rect, base=base,
                grad=grad, grad_dir=grad_dir, grating=grating, grating_freq=grating_freq, grating_phase=grating_phase,
                noise_amp=noise_amp)


def _composite(canvas: torch.Tensor, shapes: dict[str, torch.Tensor], sl: slice, yy: torch.Tensor,
               xx: torch.Tensor, tex: torch.Tensor) -> torch.Tensor:
    """Paint the shapes `sl` over canvas (n, 3, S, S), bottom to top, anti-aliased: out = sum_k w_k c_k(x) +
    T canvas, with w_k = alpha_k prod_{j>k} (1 - alpha_j), T = prod_j (1 - alpha_j) and
    c_k(x) = base_k + grad_k proj_k(x) + (stripes_k(x) + noise_k tex(x)) (the last two grey)."""
    p = {key: value[:, sl, None, None] for key, value in shapes.items() if value.dim() == 2}  # (n, m, 1, 1)
    dy, dx = yy - p["cy"], xx - p["cx"]  # (n, m, S, S)
    ct, st = torch.cos(p["theta"]), torch.sin(p["theta"])
    u, v = dx * ct + dy * st, -dx * st + dy * ct
    a, b = p["ax_a"], p["ax_b"]
    ell = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
    rect = torch.maximum(u.abs() / a, v.abs() / b)
    d = torch.where(p["is_rect"], rect, ell)
    alpha = (0.5 - (d - 1) * torch.minimum(a, b)).clamp(0, 1)  # coverage (n, m, S, S)
    proj = (dx * torch.cos(p["grad_dir"]) + dy * torch.sin(p["grad_dir"])) / (2 * p["r"])
    stripes = p["grating"] * torch.sin(2 * math.pi * p["grating_freq"] * u + p["grating_phase"])
    keep = torch.flip(torch.cumprod(torch.flip(1 - alpha, [1]), 1), [1])  # prod_{j>=k}  (n, m, S, S)
    w = alpha * torch.cat([keep[:, 1:], torch.ones_like(keep[:, :1])], 1)  # (n, m, S, S)
    mod = (w * (stripes + p["noise_amp"] * tex)).sum(1, keepdim=True)  # (n, 1, S, S)
    return (keep[:, :1] * canvas + mod + torch.einsum("nmhw,nmc->nchw", w, shapes["base"][:, sl])
            + torch.einsum("nmhw,nmc->nchw", w * proj, shapes["grad"][:, sl]))


def dead_leaves(n: int, size: int, generator: torch.Generator, palette: torch.Tensor | None = None,
                num_shapes: int = 64, rmin: float = 3.0, rmax: float | None = None,
                chunk: int = 32, blur_max: float = 0.8, noise_max: float = 0.02) -> torch.Tensor:
    """Dead-leaves images: occluding shapes with power-law radii, natural colours, textures.

    Args:
        n, size: number and side of the images.
        generator: torch.Generator on the device the images are made on.
        palette: (P, 3) colours in [-1, 1] to draw shape colours from (e.g. `ImageBank.palette`);
            None draws uniform random colours.
        num_shapes: shapes per image (drawn bottom to top over a gradient background).
        rmin, rmax: radius range in pixels; density ~ r^-3 (rmax defaults to `size`).
        chunk: shapes composited per vectorised step (memory n * chunk * 3 * S^2 floats).
        blur_max: per-image Gaussian blur sigma ~ U(0, blur_max) pixels.
        noise_max: per-image white-noise std ~ U(0, noise_max).
    Returns:
        (n, 3, size, size) float32 in [-1, 1] on the generator's device.
    """
    draw = _Draws(generator, palette)
    grid = torch.arange(size, dtype=torch.float32, device=generator.device) + 0.5
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")  # (S, S)
    canvas = _gradient_background(draw, n, size, yy, xx)
    tex = _texture_field(draw, n, size)
    shapes = _leaf_shapes(draw, n, num_shapes, size, rmin, float(size) if rmax is None else rmax)
    for s in range(0, num_shapes, chunk):
        canvas = _composite(canvas, shapes, slice(s, min(s + chunk, num_shapes)), yy, xx, tex)
    canvas = _gaussian_blur(canvas, draw.rand(n) * blur_max)
    noise_std = (draw.rand(n) * noise_max)[:, None, None, None]
    return (canvas + draw.randn(*canvas.shape) * noise_std).clamp(-1, 1)


class TrainingImages:
    """The training stream: a fixed fraction of dead leaves, the rest photo crops, on one device.

    Args:
        size: image side S.
        device: where batches are made (the generator must live there too).
        dead_leaves_fraction: share of each batch drawn from `dead_leaves` (0..1).
        palette_size: number of colours kept for dead-leaves shapes (pixels of the RGB photos).
        seed: seeds the palette draw (the batches use the generator passed to `sample`).
        dead_leaves_kwargs: extra keyword arguments for `dead_leaves`.
        permute_channels: give each image a random permutation of its RGB channels, so that colours
            the training photos lack (the dark blue of a night sky) are seen as often as those they
            have; for the VQ-VAE, which must reproduce any colour, not for the priors' statistics.
    """

    def __init__(self, size: int = 64, device: torch.device | str = "cpu", dead_leaves_fraction: float = 0.5,
                 palette_size: int = 65536, seed: int = 0, dead_leaves_kwargs: dict | None = None,
                 permute_channels: bool = False):
        if not 0.0 <= dead_leaves_fraction <= 1.0:
            raise ValueError(f"dead_leaves_fraction must be in [0, 1], got {dead_leaves_fraction}")
        self.size = size
        self.device = torch.device(device)
        self.fraction = dead_leaves_fraction
        self.bank = training_bank(size, self.device)
        g = torch.Generator(device=self.device).manual_seed(seed + 99991)
        self.palette = self.bank.palette(palette_size, g, num_images=len(TRAINING_RGB_NAMES))
        self.dead_leaves_kwargs = dead_leaves_kwargs or {}
        self.permute_channels = permute_channels

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 3, S, S) in [-1, 1]: round(n * fraction) dead-leaves images first, then photo crops."""
        n_dl = int(round(n * self.fraction))
        parts = []
        if n_dl > 0:
            parts.append(dead_leaves(n_dl, self.size, generator, self.palette, **self.dead_leaves_kwargs))
        if n - n_dl > 0:
            parts.append(self.bank.sample(n - n_dl, generator))
        x = torch.cat(parts)
        if self.permute_channels:  # (n, 3) channel order per image, one of the 6 permutations
            order = torch.rand(n, 3, generator=generator, device=self.device).argsort(dim=1)
            x = torch.gather(x, 1, order[:, :, None, None].expand_as(x))
        return x
