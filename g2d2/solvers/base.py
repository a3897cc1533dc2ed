"""The solver interface.

A solver is built from its yaml (`conf/solver/<name>.yaml`, keys = constructor arguments) plus the
instantiated `noise_schedule` object, and then solves one batch at a time:

    x_hat = solver.solve(prior, operator, y, generator=g, progress=True, callback=None)

It receives everything it needs as arguments (dependency injection): it never reads the global
config, writes files or plots. All its randomness comes from `generator`: one CPU torch.Generator, or
one per image of the batch (what the runner passes; image b's draws then come from generator b, so a
batched solve equals the images' solves one by one, see g2d2.rng). A solver draws one seed from each
and makes the generator(s) of its per-step draws on the device it solves on (`g2d2.rng.device_generator`),
so a step never draws on the CPU and copies to the GPU (a copy from pageable host memory synchronises the
stream). Results are deterministic under the seeds on a given device; CPU and CUDA runs draw different
numbers.

Inside the step loop a solver reads nothing back from the device: schedule values are Python floats
computed before the loop, and NaN/Inf checks go through `FiniteGuard`, which synchronises only every
`every` steps.

`callback(step, t, state)`, when given, is called at the end of every step of the solver's loop (as
diffusers' `callback_on_step_end`) with the step index, the prior's timestep and a dict of the step's
device tensors, batch first: DPS {"x_t", "x0"}, RED-Diff {"x0", "loss"} (x0 = the variational mean),
G2D2 {"alpha", "tokens"} (the fitted logits (B, K, N) and the re-noised tokens (B, N)). The solver
passes references it does not modify afterwards and reads nothing back; whatever the callback reads
from the device is its own synchronisation. Used for progress displays, timing and logging of
intermediate estimates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from g2d2.operators.base import LinearOperator
from g2d2.rng import Generators

#: `callback(step, t, state)` of `Solver.solve` (see the module docstring)
StepCallback = Callable[[int, int, dict[str, torch.Tensor]], None]


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
        generator: Generators,
        progress: bool = False,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Reconstruct x from y = A x + n.

        Args:
            prior: the prior (a DiscretePrior or PixelPrior, per `prior_kind`), or None.
            operator: the task's linear operator A.
            y: the measurement, shape of `operator.forward` output, batch B.
            generator: CPU generator for every random draw, or one per image (batch B).
            progress: show a tqdm progress bar.
            callback: called after every step with (step, t, state); see the module docstring.
        Returns:
            (B, C, H, W) reconstruction in [-1, 1].
        """
        raise NotImplementedError


class FiniteGuard:
    """NaN/Inf check of a loop's iterate that synchronises with the device only every `every` steps.

    `update(x, step)` folds `isfinite(x).all()` into a flag kept on x's device (no host sync); every
    `every` steps, and at `finish()`, the flag is read once and a NonFiniteError names the window of
    steps in which the iterate became NaN/Inf (a NaN iterate stays NaN in these solvers).

    Args:
        what: what is checked, for the message.
        every: steps between host reads of the flag (1 = check every step).
    """

    def __init__(self, what: str, every: int = 25) -> None:
        if every < 1:
            raise ValueError(f"FiniteGuard needs every >= 1, got {every}")
        self.what, self.every = what, int(every)
        self._flag: torch.Tensor | None = None
        self._first = self._last = None  # steps folded into the flag since the last read

    def update(self, x: torch.Tensor, step: int) -> None:
        ok = torch.isfinite(x.detach()).all()
        self._flag = ok if self._flag is None else self._flag & ok
        self._first = step if self._first is None else self._first
        self._last = step
        if (step + 1) % self.every == 0:
            self.finish()

    def finish(self) -> None:
        """Read the flag (one host sync) and raise if any folded step was not finite."""
        if self._flag is None:
            return
        ok, first, last = bool(self._flag), self._first, self._last
        self._flag = self._first = self._last = None
        if not ok:
            where = f"at step {first}" if first == last else f"between steps {first} and {last}"
            raise NonFiniteError(
                f"{self.what} became NaN/Inf {where}; lower the learning rate / step size or check the prior"
            )


def check_finite(x: torch.Tensor, what: str, step: int | None = None) -> None:
    """Raise NonFiniteError naming `what` (and the step) when x holds NaN or Inf."""
    if not torch.isfinite(x).all():
        where = f" at step {step}" if step is not None else ""
        raise NonFiniteError(f"{what} became NaN/Inf{where}; lower the learning rate / step size or check the prior")
