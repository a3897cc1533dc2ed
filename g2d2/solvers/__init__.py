"""Solvers: one algorithm per module (g2d2, red_diff, dps, pinv); the interface is in `base`."""

from g2d2.solvers.base import Solver

__all__ = ["Solver"]
