"""Random streams of a solve: one torch.Generator per image, so a batch draws what its images draw alone.

A solver receives `generator`: either one torch.Generator (one stream for the whole batch) or a sequence
of them, one per image of the batch (what the runner passes). A draw of shape (B, ...) then takes row b
from generator b, so image b of a batch sees the same random numbers as in a solve of its own with
generator b: batched solves equal sequential ones, up to float rounding of the batched networks.

`device_generator` turns the CPU generator(s) into generator(s) on the solve's device (one seed drawn
from each), so a step never draws on the host and copies to the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: one generator for the whole batch, or one per image
Generators = torch.Generator | Sequence[torch.Generator]


def device_generator(generator: Generators, device: torch.device | str) -> Generators:
    """Generator(s) on `device`, each seeded by one draw from the matching CPU generator (advancing it by one)."""
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return torch.Generator(device=device).manual_seed(seed)
    return [device_generator(g, device) for g in generator]


def _draw(fill: str, shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """A float32 tensor of `shape` on the generators' device filled in place by `Tensor.<fill>_` from one
    generator, or row b of the batch (dim 0) from generator b (written into its row: no concatenation)."""
    single = isinstance(generator, torch.Generator)
    if not single and len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} per-image generators for a batch of {shape[0]}: pass one per image")
    out = torch.empty(shape, dtype=torch.float32, device=(generator if single else generator[0]).device)
    for row, g in [(out, generator)] if single else zip(out, generator, strict=True):
        getattr(row, fill)(generator=g)
    return out


def rand(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """U[0, 1) float32 draws of `shape` (batch first), on the generators' device."""
    return _draw("uniform_", shape, generator)


def randn(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """Standard normal float32 draws of `shape` (batch first), on the generators' device."""
    return _draw("normal_", shape, generator)
