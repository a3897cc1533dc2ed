"""Denoising: A = I (the task is then only the measurement noise of std sigma)."""

from __future__ import annotations

import torch

from g2d2.operators.base import LinearOperator


class Identity(LinearOperator):
    """A x = x on (B, C, H, W) images; adjoint and pseudo-inverse are the identity too.

    Args:
        image_size: side length H = W of the images.
        channels: number of image channels C.
        generator: unused (nothing is random); accepted like every operator's.
    """

    def __init__(self, image_size: int, channels: int = 3, generator: torch.Generator | None = None) -> None:
        super().__init__(image_size, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns a copy, so callers may modify the measurement in place without touching x."""
        self.check_image(x)
        return x.clone()

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y.clone()

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y.clone()
