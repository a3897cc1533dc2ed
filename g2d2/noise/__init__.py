"""Noise processes (`noise_schedule` config group). For G2D2: how to move from z_t to an earlier
time given the optimised posterior over clean tokens (`StarShaped`, `MarkovPosterior`; shared
VQ-Diffusion schedule math in `vq_schedule`). For RED-Diff and DPS: which timesteps of the
prior's DDPM chain to visit (`DDPMTimesteps`)."""

from g2d2.noise.ddpm import DDPMTimesteps
from g2d2.noise.markov import MarkovPosterior
from g2d2.noise.star import StarShaped

__all__ = ["DDPMTimesteps", "MarkovPosterior", "StarShaped"]
