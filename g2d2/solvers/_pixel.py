"""Checks and helpers shared by the pixel-space solvers (RED-Diff, DPS)."""

from __future__ import annotations

import torch

from g2d2 import rng
from g2d2.noise.ddpm import DDPMTimesteps
from g2d2.priors.base import PixelPrior
from g2d2.rng import Generators


def check_noise_schedule(solver: object, noise_schedule: object | None) -> DDPMTimesteps:
    """The DDPM time grid a pixel solver was given (None: the default one), or a clear TypeError."""
    name = type(solver).__name__
    if noise_schedule is None:
        return DDPMTimesteps()
    if not isinstance(noise_schedule, DDPMTimesteps):
        raise TypeError(f"{name} needs a DDPM time grid (noise_schedule=ddpm), got {type(noise_schedule).__name__}")
    return noise_schedule


def check_prior(solver: object, prior: object) -> PixelPrior:
    """`prior` if it is a PixelPrior, else a clear TypeError."""
    if not isinstance(prior, PixelPrior):
        raise TypeError(
            f"{type(solver).__name__} needs a pixel-space prior (PixelPrior, e.g. prior=tiny_ddpm), "
            f"got {type(prior).__name__}"
        )
    return prior


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x (batch first), drawn with `generator` (one, or one per image: see
    g2d2.rng) on its own device (the solvers pass generators on x's device, so nothing is copied from the host),
    in x's dtype and device."""
    return rng.randn(tuple(x.shape), generator).to(device=x.device, dtype=x.dtype)
