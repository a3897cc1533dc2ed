"""Super-resolution: downsampling by an integer factor (bicubic with antialiasing, or average pooling).

The bicubic variant is the DPS / G2D2 protocol ("Resizer", MATLAB `imresize`): torch's own
`F.interpolate(mode="bicubic", antialias=True)` applied to the image padded symmetrically (numpy's
"symmetric": mirror including the edge pixel) by 2 * factor pixels, then cropped back.

Both variants are separable linear maps, A x = R x R^T per channel with a (H / f, H) matrix R. We
build R once, in float64 on the CPU, by running that exact torch pipeline on the unit vectors, so
 - forward is two small matmuls (identical to the pipeline to ~1e-16 in float64; tested),
 - the adjoint is exact: A^T y = R^T y R,
 - the pseudo-inverse is exact too: A^+ = R^+ (x) R^+, so A^+ y = R^+ y (R^+)^T, with R^+ the
   Moore-Penrose inverse of the small matrix (for average pooling R^+ = f R^T, i.e. nearest
   upsampling). For bicubic x4 the singular values of R lie in [0.35, 0.5], so A^+ amplifies the
   measurement noise by at most ~2.8x per axis: it is a usable "no prior" baseline and init.

References: Chung et al., "Diffusion Posterior Sampling" (ICLR 2023), its `Resizer`; Kawar et al.,
"DDRM" (NeurIPS 2022) for the average-pooling variant.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from g2d2.operators.base import LinearOperator

_MODES = ("bicubic", "avgpool")


def symmetric_pad_indices(n: int, pad: int) -> torch.Tensor:
    """Indices that pad a length-n axis by `pad` on both sides, numpy "symmetric" style.

    Example: n = 4, pad = 2 -> [1, 0, 0, 1, 2, 3, 3, 2].
    """
    if pad > n:
        raise ValueError(f"symmetric padding of {pad} px needs an axis of at least {pad} px, got {n}")
    i = torch.arange(-pad, n + pad)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def bicubic_matrix(n: int, factor: int) -> torch.Tensor:
    """The (n / factor, n) float64 matrix of 1D antialiased bicubic downsampling (DPS Resizer)."""
    pad = 2 * factor
    eye = torch.eye(n, dtype=torch.float64)[:, symmetric_pad_indices(n, pad)]  # (n, n + 2 pad)
    # interpolate along the last axis only (height 1 -> 1); the 2D op is the product of two such passes
    rows = F.interpolate(
        eye[:, None, None, :], size=(1, (n + 2 * pad) // factor), mode="bicubic", antialias=True,
        align_corners=False,
    )[:, 0, 0, 2:-2]  # (n, n / factor): image of each unit vector, cropped by pad / factor = 2
    return rows.T.contiguous()


def avgpool_matrix(n: int, factor: int) -> torch.Tensor:
    """The (n / factor, n) float64 matrix of 1D average pooling by `factor`."""
    return torch.kron(torch.eye(n // factor, dtype=torch.float64), torch.full((1, factor), 1.0 / factor))


class SuperResolution(LinearOperator):
    """Downsample (B, C, H, W) images by `factor` to (B, C, H / factor, W / factor).

    Args:
        image_size: side length H = W of the input images.
        factor: integer downsampling factor; must divide `image_size`.
        mode: "bicubic" (antialiased, symmetric padding: DPS / G2D2 protocol) or "avgpool"
            (factor x factor box average: DDRM / RED-Diff).
        channels: number of image channels C.
        generator: unused (the operator is deterministic); accepted like every operator's.

    Raises:
        ValueError: for an unknown mode or a factor that does not divide `image_size`.
    """

    def __init__(
        self,
        image_size: int,
        factor: int = 4,
        mode: Literal["bicubic", "avgpool"] = "bicubic",
        channels: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(image_size, channels)
        if mode not in _MODES:
            raise ValueError(f"SuperResolution mode must be one of {_MODES}, got {mode!r}")
        if int(factor) != factor or factor < 1:
            raise ValueError(f"SuperResolution factor must be a positive integer, got {factor}")
        factor = int(factor)
        if image_size % factor != 0:
            raise ValueError(
                f"SuperResolution factor {factor} does not divide image_size {image_size}; choose a "
                f"data.image_size that is a multiple of {factor} or another task.operator.factor"
            )
        self.factor = factor
        self.mode = mode
        self.low_size = image_size // factor
        matrix = bicubic_matrix if mode == "bicubic" else avgpool_matrix
        self.matrix = matrix(image_size, factor)  # (h, H) float64, R
        if mode == "avgpool":
            self.matrix_pinv = self.matrix.T * factor  # nearest upsampling, exactly R^+
        else:
            self.matrix_pinv = torch.linalg.pinv(self.matrix)  # (H, h), R^+

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H / factor, W / factor), R x R^T in x's dtype."""
        self.check_image(x)
        r = self.as_dtype("matrix", x.dtype)
        return r @ x @ r.T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, H, W), exactly R^T y R."""
        r = self.as_dtype("matrix", y.dtype)
        return r.T @ y @ r

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Exact Moore-Penrose inverse, (B, C, h, w) -> (B, C, H, W)."""
        r_pinv = self.as_dtype("matrix_pinv", y.dtype)
        return r_pinv @ y @ r_pinv.T
