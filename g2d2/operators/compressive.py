"""Compressive sensing with a structurally random matrix: y = S F D x.

D flips the sign of each pixel at random (seeded), F is the orthonormal 2D DCT-II of each channel,
and S keeps a seeded random subset of m = round(ratio * n) of the n = C * H * W coefficients. The
rows of A are orthonormal (A A^T = S F D D F^T S^T = I), so A^T is the exact pseudo-inverse.
Memory is O(image): the signs (C, H, W), the indices (m,), and one (H, H) DCT matrix (applied on
both axes as two matmuls, so no dense (m x n) matrix is ever formed).

This is our definition (the G2D2 paper names the task without specifying its matrix); the
construction is the "structurally random matrix" of Do, Gan, Nguyen and Tran (IEEE TSP 2012).
"""

from __future__ import annotations

import math

import torch

from g2d2.operators.base import LinearOperator


def dct_matrix(n: int) -> torch.Tensor:
    """(n, n) float64 orthonormal DCT-II matrix C: coefficients = C @ signal, C C^T = I."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


class CompressiveSensing(LinearOperator):
    """(B, C, H, W) images -> (B, m) measurements with orthonormal rows.

    Args:
        image_size: side length H = W of the images.
        ratio: measurement ratio m / n in (0, 1].
        channels: number of image channels C.
        generator: CPU torch.Generator for the signs and the subset; None: a fresh, unseeded one.
    """

    def __init__(
        self,
        image_size: int,
        ratio: float = 0.25,
        channels: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(image_size, channels)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"compressive sensing ratio must be in (0, 1], got {ratio}")
        generator = generator if generator is not None else torch.Generator()
        self.ratio = float(ratio)
        n = channels * image_size * image_size
        self.num_measurements = max(1, round(ratio * n))
        shape = (channels, image_size, image_size)
        self.signs = torch.randint(0, 2, shape, generator=generator).to(torch.float32) * 2 - 1  # D
        self.indices = torch.randperm(n, generator=generator)[: self.num_measurements].sort().values  # S
        self.dct = dct_matrix(image_size)  # F = dct (x) dct per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, m)."""
        self.check_image(x)
        c = self.as_dtype("dct", x.dtype)
        coeffs = c @ (x * self.as_dtype("signs", x.dtype)) @ c.T  # (B, C, H, W)
        return coeffs.flatten(1)[:, self.indices]

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, C, H, W); also the exact pseudo-inverse since A A^T = I."""
        if y.ndim != 2 or y.shape[1] != self.num_measurements:
            raise ValueError(
                f"CompressiveSensing expects measurements of shape (B, {self.num_measurements}), "
                f"got {tuple(y.shape)}"
            )
        c = self.as_dtype("dct", y.dtype)
        coeffs = y.new_zeros(y.shape[0], math.prod(self.image_shape))
        coeffs[:, self.indices] = y
        coeffs = coeffs.view(y.shape[0], *self.image_shape)
        return (c.T @ coeffs @ c) * self.as_dtype("signs", y.dtype)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Exact Moore-Penrose inverse A^+ = A^T (rows of A are orthonormal)."""
        return self.adjoint(y)

    def state(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "indices": self.indices}
