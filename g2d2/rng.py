"""Random streams of a solve: one torch.Generator per image, so a batch draws what its images draw alone.

A solver receives `generator`: either one torch.Generator (one stream for the whole batch) or a sequence
of them, one per image of the batch (what the runner passes). A draw of shape (B, ...) then takes row b
from generator b, so image b of a batch sees the same random numbers as in a solve of its own with
generator b: batched solves equal sequential ones, up to float rounding of the batched networks.

`device_generator` turns the CPU generator(s) into generator(s) on the solve's device (one seed drawn
from each), so a step never draws on the host and copies to the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: one generator for the whole batch, or one per image
Generators = torch.Generator | Sequence[torch.Generator]


def device_generator(generator: Generators, device: torch.device | str) -> Generators:
    """Generator(s) on `device`, each seeded by one draw from the matching CPU generator (advancing it by one)."""
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return torch.Generator(device=device).manual_seed(seed)
    return [device_generator(g, device) for g in generator]


def _draw(fn: Callable[..., torch.Tensor], shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """`fn(shape)` from one generator, or row b of the batch (dim 0) from generator b, on the generators' device."""
    if isinstance(generator, torch.Generator):
        return fn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} per-image generators for a batch of {shape[0]}: pass one per image")
    rows = [fn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generator]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def rand(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """U[0, 1) float32 draws of `shape` (batch first), on the generators' device."""
    return _draw(torch.rand, shape, generator)


def randn(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """Standard normal float32 draws of `shape` (batch first), on the generators' device."""
    return _draw(torch.randn, shape, generator)
