"""Noise processes (`noise_schedule` config group). For G2D2: how to move from z_t to an earlier
time given the optimised posterior over clean tokens (`StarShaped`, `MarkovPosterior`); the shared
VQ-Diffusion schedule math lives in `vq_schedule`."""

from g2d2.noise.markov import MarkovPosterior
from g2d2.noise.star import StarShaped

__all__ = ["MarkovPosterior", "StarShaped"]
