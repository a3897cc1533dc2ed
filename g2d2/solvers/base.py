"""The solver interface.

A solver is built from its yaml (`conf/solver/<name>.yaml`, keys = constructor arguments) plus the
instantiated `noise_schedule` object, and then solves one batch at a time:

    x_hat = solver.solve(prior, operator, y, generator=g, progress=True)

It receives everything it needs as arguments (dependency injection): it never reads the global
config, writes files or plots. All its randomness comes from `generator` (a CPU torch.Generator;
draw on the CPU and move, so numbers do not depend on the device).
"""

from __future__ import annotations

import torch

from g2d2.operators.base import LinearOperator


class NonFiniteError(RuntimeError):
    """Raised when a solver iterate becomes NaN or Inf; the runner logs it and moves on."""


class Solver:
    """Base class of all solvers."""

    #: which prior interface the solver needs: "discrete", "pixel" or None (no prior)
    prior_kind: str | None = None

    def solve(
        self,
        prior: torch.nn.Module | None,
        operator: LinearOperator,
        y: torch.Tensor,
        generator: torch.Generator,
        progress: bool = False,
    ) -> torch.Tensor:
        """Reconstruct x from y = A x + n.

        Args:
            prior: the prior (a DiscretePrior or PixelPrior, per `prior_kind`), or None.
            operator: the task's linear operator A.
            y: the measurement, shape of `operator.forward` output, batch B.
            generator: CPU generator for every random draw.
            progress: show a tqdm progress bar.
        Returns:
            (B, C, H, W) reconstruction in [-1, 1].
        """
        raise NotImplementedError


def check_finite(x: torch.Tensor, what: str, step: int | None = None) -> None:
    """Raise NonFiniteError naming `what` (and the step) when x holds NaN or Inf."""
    if not torch.isfinite(x).all():
        where = f" at step {step}" if step is not None else ""
        raise NonFiniteError(
            f"{what} became NaN/Inf{where}; lower the learning rate / step size or check the prior"
        )
