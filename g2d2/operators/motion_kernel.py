"""Random camera-shake (motion blur) kernels, drawn only from a torch.Generator.

Our own generator in the spirit of the one DPS used (a random-walk trajectory drawn on a 2x canvas,
smoothed and downsampled). All lengths are relative to the canvas diagonal, so a kernel drawn at
15 px looks like the same kind of shake as one drawn at 61 px.

1. Path length L = 0.75 * diag * (u1 + u2 * intensity^2), u ~ U(0, 1).
2. Step lengths s_k = b_k * (1 - intensity + eps) * diag with b_k ~ Beta(1, 30), until sum >= L.
3. Headings: the first uniform in (-pi, pi); afterwards |a_k| ~ Triangular(0, intensity * a_max,
   a_max) with a_max ~ U(0, intensity * pi); the sign of the previous heading is kept, or flipped
   with probability j ~ Beta(2, 20) (a small jitter that makes the path zig-zag).
4. Vertices = cumulative sums of s_k exp(i a_k), centred on their mean, rotated by U(0, pi), placed
   at the canvas centre; the polyline is drawn anti-aliased (bilinear splats every 1/4 px).
5. Gaussian smoothing (std 0.01 * diag, at least 0.3 px), 2 x 2 average pooling to the kernel size,
   normalisation to sum 1. Every step is non-negative, so the kernel is too.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-6


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _beta_1_b(generator: torch.Generator, b: float) -> float:
    """Beta(1, b) by inverting its CDF 1 - (1 - x)^b."""
    return 1.0 - (1.0 - _uniform(generator)) ** (1.0 / b)


def _beta_int(generator: torch.Generator, a: int, b: int) -> float:
    """Beta(a, b) for integers a, b: the a-th smallest of a + b - 1 uniforms."""
    u = torch.rand(a + b - 1, generator=generator, dtype=torch.float64)
    return torch.sort(u).values[a - 1].item()


def _triangular(generator: torch.Generator, low: float, mode: float, high: float) -> float:
    """Triangular(low, mode, high) by inverting its CDF."""
    u, width = _uniform(generator), high - low
    cut = (mode - low) / width
    if u < cut:
        return low + math.sqrt(u * width * (mode - low))
    return high - math.sqrt((1.0 - u) * width * (high - mode))


def shake_path(canvas: int, intensity: float, generator: torch.Generator) -> torch.Tensor:
    """(N + 1, 2) float64 vertices (row, col) of a random shake trajectory on a canvas x canvas grid."""
    diag = math.sqrt(2.0) * canvas
    # 1-2. total length and step lengths
    length = 0.75 * diag * (_uniform(generator) + _uniform(generator) * intensity**2)
    steps: list[float] = []
    while sum(steps) < length:
        steps.append(_beta_1_b(generator, 30.0) * (1.0 - intensity + _EPS) * diag)
    # 3. headings
    max_angle = _uniform(generator, 0.0, intensity * math.pi)
    jitter = _beta_int(generator, 2, 20)
    angles = [_uniform(generator, -math.pi, math.pi)]
    while len(angles) < len(steps):
        a = _triangular(generator, 0.0, intensity * max_angle, max_angle + _EPS)
        sign = math.copysign(1.0, angles[-1])
        angles.append(-sign * a if _uniform(generator) < jitter else sign * a)
    # 4. vertices, centred, rotated, placed at the canvas centre
    inc = torch.polar(torch.tensor(steps, dtype=torch.float64), torch.tensor(angles, dtype=torch.float64))
    path = torch.cat([torch.zeros(1, dtype=torch.complex128), torch.cumsum(inc, 0)])
    rotation = complex(math.cos(theta := _uniform(generator, 0.0, math.pi)), math.sin(theta))
    path = (path - path.mean()) * rotation
    path = path + complex((canvas - 1) / 2, (canvas - 1) / 2)
    return torch.stack([path.real, path.imag], dim=-1)


def draw_polyline(path: torch.Tensor, canvas: int) -> torch.Tensor:
    """(canvas, canvas) float64 image of the polyline through `path` (N + 1, 2), bilinear splats."""
    start, end = path[:-1], path[1:]
    seg_len = (end - start).norm(dim=-1)  # (N,)
    n_sub = int(torch.ceil(seg_len.max() * 4).item()) + 1
    t = (torch.arange(n_sub, dtype=torch.float64) / n_sub)[None, :, None]  # [0, 1): joints drawn once
    points = (start[:, None] + t * (end - start)[:, None]).reshape(-1, 2)  # (M, 2)
    mass = (seg_len[:, None] / n_sub).expand(-1, n_sub).reshape(-1)  # ink per point ~ length: even line
    image = torch.zeros(canvas * canvas, dtype=torch.float64)
    base = points.floor()
    frac = points - base
    base = base.long()
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = base[:, 0] + dr, base[:, 1] + dc
            w = (frac[:, 0] if dr else 1 - frac[:, 0]) * (frac[:, 1] if dc else 1 - frac[:, 1])
            inside = (r >= 0) & (r < canvas) & (c >= 0) & (c < canvas)
            image.index_add_(0, r[inside] * canvas + c[inside], (w * mass)[inside])
    return image.reshape(canvas, canvas)


def _smooth(image: torch.Tensor, std: float) -> torch.Tensor:
    """Separable Gaussian smoothing with zero padding (keeps non-negativity)."""
    radius = max(1, math.ceil(3 * std))
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / std) ** 2)
    g = g / g.sum()
    x = image[None, None]
    x = torch.nn.functional.conv2d(x, g.view(1, 1, -1, 1), padding=(radius, 0))
    x = torch.nn.functional.conv2d(x, g.view(1, 1, 1, -1), padding=(0, radius))
    return x[0, 0]


def motion_kernel(size: int, intensity: float, generator: torch.Generator) -> torch.Tensor:
    """(size, size) float64 motion-blur kernel, non-negative, summing to 1.

    Args:
        size: kernel side in pixels (odd in our operators, any positive size works).
        intensity: shake intensity in [0, 1].
        generator: CPU torch.Generator, the only source of randomness.
    """
    canvas = 2 * size
    image = draw_polyline(shake_path(canvas, intensity, generator), canvas)
    image = _smooth(image, max(0.3, 0.01 * math.sqrt(2.0) * canvas))
    kernel = torch.nn.functional.avg_pool2d(image[None, None], 2)[0, 0].clamp_min(0.0)
    total = kernel.sum()
    if total <= 0:  # the whole path fell off the canvas (practically impossible): no blur
        kernel = torch.zeros(size, size, dtype=torch.float64)
        kernel[size // 2, size // 2] = 1.0
        return kernel
    return kernel / total
