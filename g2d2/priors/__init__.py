"""Diffusion priors: discrete (VQ-Diffusion, for G2D2) and pixel-space (DDPM/ADM, for RED-Diff and DPS)."""

from g2d2.priors.base import DiscretePrior, PixelPrior

__all__ = ["DiscretePrior", "PixelPrior"]
