"""Markov re-noising for G2D2: the standard VQ-Diffusion reverse step driven by the optimised
posterior, z_s ~ sum_{z0} q(z_s | z_t, z0) q_alpha*(z0) (the "diffusion" posterior of the public
G2D2 code, i.e. diffusers' `VQDiffusionScheduler.step` with q_alpha* as model output).

Mask tokens are absorbing in the forward process, so in reverse a revealed token is never masked
again; with every timestep (s = t - 1) this is exactly diffusers' step. With skipped timesteps we
jump straight to the next scheduled time s with the exact multi-step kernel q(z_t | z_s) (the public
code steps to t - 1 and then evaluates the transformer at s, which mislabels the time).

Reference: Gu et al., "Vector Quantized Diffusion Model for Text-to-Image Synthesis", CVPR 2022, Eq. (11).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from g2d2.noise.vq_schedule import markov_posterior_log_probs, sample_categorical
from g2d2.rng import Generators

if TYPE_CHECKING:
    from g2d2.priors.base import DiscretePrior


class MarkovPosterior:
    """z_s ~ sum_{z0} q(z_s | z_t, z0) q_alpha*(z0); at the last step (s = -1) z0 ~ q_alpha*(z0)."""

    #: which solvers can use it: the discrete (token) ones
    kind = "discrete"

    def renoise(
        self,
        prior: DiscretePrior,
        log_q_x0: torch.Tensor,
        tokens_t: torch.Tensor,
        t: int,
        s: int,
        generator: Generators,
    ) -> torch.Tensor:
        """Move from time t to the earlier time s (s = -1: return a clean sample z0).

        Args:
            prior: gives K and the schedules.
            log_q_x0: (B, K, N) log q_alpha*(z0).
            tokens_t: (B, N) long current tokens z_t in [0, K].
            t: current time; s: target time, -1 <= s < t.
            generator: the Gumbel-max draw comes from it (on its own device, then moved).
        Returns:
            (B, N) long tokens z_s in [0, K].
        """
        if not -1 <= s < t:
            raise ValueError(f"renoise needs -1 <= s < t, got s={s}, t={t}")
        if s < 0:
            # 1. last step: the clean tokens themselves
            return sample_categorical(log_q_x0, generator)
        # 2. posterior over z_s (K codes + mask), then an exact Gumbel-max draw
        log_p = markov_posterior_log_probs(prior, log_q_x0, tokens_t, t, s)  # (B, K+1, N)
        return sample_categorical(log_p, generator)
