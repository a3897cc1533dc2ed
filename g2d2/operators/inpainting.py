"""Inpainting: a box or random pixels are missing (DPS protocol), the same pixels in every channel.

The measurement keeps the image shape with missing pixels set to 0: A = diag(mask), so A is its
own adjoint and its own Moore-Penrose pseudo-inverse (exact on observed pixels, 0 elsewhere).

References: Chung et al., "Diffusion Posterior Sampling" (ICLR 2023): 128 x 128 box at a random
position with a 16 px margin at 256 px; random inpainting with 92 % missing in the paper, 30-70 %
drawn per image in its code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from g2d2.operators.base import LinearOperator


class _Masking(LinearOperator):
    """A = diag(mask) on (B, C, H, W) images; `mask` is (1, 1, H, W) float32, 1 = observed."""

    mask: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) with missing pixels set to 0."""
        self.check_image(x)
        return x * self.as_dtype("mask", x.dtype)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.as_dtype("mask", y.dtype)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.as_dtype("mask", y.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask}


class BoxInpainting(_Masking):
    """A square box of pixels is missing.

    Args:
        image_size: side length H = W of the images.
        box_size: side of the missing box in pixels at `reference_size`.
        margin: minimum distance in pixels (at `reference_size`) between the box and the image border.
        random_position: draw the box position uniformly within the margins; False: centre it.
        reference_size: image size box_size and margin refer to; both scale by
            image_size / reference_size (rounded). None: use them as given.
        channels: number of image channels C.
        generator: CPU torch.Generator for the position; None: a fresh, unseeded one.

    Raises:
        ValueError: if the box and its margins do not fit in the image.
    """

    def __init__(
        self,
        image_size: int,
        box_size: int = 128,
        margin: int = 16,
        random_position: bool = True,
        reference_size: int | None = 256,
        channels: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(image_size, channels)
        scale = 1.0 if reference_size is None else image_size / reference_size
        self.box_size = max(1, round(box_size * scale))
        self.margin = max(0, round(margin * scale))
        last = image_size - self.margin - self.box_size  # largest top / left coordinate
        if last < self.margin:
            raise ValueError(
                f"a {self.box_size} px box with {self.margin} px margins does not fit in {image_size} px "
                f"images; lower box_size / margin or set reference_size"
            )
        if random_position:
            generator = generator if generator is not None else torch.Generator()
            top, left = torch.randint(self.margin, last + 1, (2,), generator=generator).tolist()
        else:
            top = left = (image_size - self.box_size) // 2
        self.top, self.left = top, left
        mask = torch.ones(1, 1, image_size, image_size)
        mask[..., top : top + self.box_size, left : left + self.box_size] = 0.0
        self.mask = mask


class RandomInpainting(_Masking):
    """A random subset of pixels is missing (exactly round(fraction * H * W) of them).

    Args:
        image_size: side length H = W of the images.
        missing_fraction: fraction of missing pixels in [0, 1), or a [lo, hi] range from which the
            fraction is drawn uniformly for each operator (i.e. each image; DPS code: [0.3, 0.7]).
        channels: number of image channels C.
        generator: CPU torch.Generator for the fraction and the pixels; None: a fresh, unseeded one.
    """

    def __init__(
        self,
        image_size: int,
        missing_fraction: float | Sequence[float] = 0.7,
        channels: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(image_size, channels)
        generator = generator if generator is not None else torch.Generator()
        if isinstance(missing_fraction, (int, float)):
            low = high = float(missing_fraction)
        else:
            bounds = [float(v) for v in missing_fraction]
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ValueError(f"missing_fraction range must be [lo, hi] with lo <= hi, got {bounds}")
            low, high = bounds
        if not (0.0 <= low and high < 1.0):
            raise ValueError(f"missing_fraction must lie in [0, 1), got {missing_fraction}")
        u = torch.rand((), generator=generator, dtype=torch.float64).item() if high > low else 0.0
        self.missing_fraction = low + (high - low) * u
        n = image_size * image_size
        missing = torch.randperm(n, generator=generator)[: round(self.missing_fraction * n)]
        mask = torch.ones(n)
        mask[missing] = 0.0
        self.mask = mask.reshape(1, 1, image_size, image_size)
