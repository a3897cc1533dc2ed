"""The no-prior baseline: x_hat = A^+ y, clamped to [-1, 1]."""

from __future__ import annotations

import torch

from g2d2.operators.base import LinearOperator
from g2d2.rng import Generators
from g2d2.solvers.base import Solver, StepCallback


class PseudoInverse(Solver):
    """Return the operator's pseudo-inverse of the measurement (no prior, no noise schedule, no steps: a
    callback is never called)."""

    prior_kind = None

    def __init__(self, noise_schedule: object | None = None) -> None:
        # accepted (and ignored) so every solver is built the same way by the runner
        self.noise_schedule = noise_schedule

    @torch.no_grad()
    def solve(
        self,
        prior: torch.nn.Module | None,
        operator: LinearOperator,
        y: torch.Tensor,
        generator: Generators,
        progress: bool = False,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        return operator.pinv(y).clamp(-1.0, 1.0)
