"""DDPM time grids and schedule math for the continuous (pixel) priors used by RED-Diff and DPS.

`DDPMTimesteps` is the `noise_schedule` config group option for continuous priors: it turns
(num_train_timesteps T, num_steps N) into the descending list of training timesteps a solver visits.
`ddpm_chain` gives the Gaussian DDPM schedule of the chain through any increasing subset of the
training timesteps (the whole chain, or a respaced one), recomputing the betas from alpha_bar as
guided-diffusion's respacing does.

References:
    Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models" (2020): q(x_{t-1} | x_t, x_0).
    Nichol, Dhariwal, "Improved Denoising Diffusion Probabilistic Models" (2021): respacing and
    the learned-range variance (log-variance clipped at t = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SPACINGS = ("linspace", "leading", "trailing")


class DDPMTimesteps:
    """Which training timesteps a continuous-prior solver visits, in descending order.

    Args:
        spacing: how N steps are spread over [0, T):
            "linspace": round(linspace(T - 1, 0, N)); includes T - 1 and 0 (guided-diffusion's
                `space_timesteps` with one section; DPS's respacing);
            "leading": every (T // N)-th timestep from 0, i.e. RED-Diff's `range(0, T, T // N)`: that is
                ceil(T / (T // N)) >= N timesteps, exactly N when T // N divides T (N = 300 of T = 1000
                gives 334, N = 7 gives 8; diffusers' "leading" keeps only the first N of them);
            "trailing": round(arange(T, 0, -T / N)) - 1 (includes T - 1, not always 0).
            All three give every timestep when N = T.
    """

    #: which solvers can use it: the pixel-space (continuous prior) ones
    kind = "pixel"

    def __init__(self, spacing: Literal["linspace", "leading", "trailing"] = "linspace") -> None:
        if spacing not in SPACINGS:
            raise ValueError(f"unknown DDPM timestep spacing '{spacing}'; use one of {SPACINGS}")
        self.spacing = spacing

    def timesteps(self, num_train_timesteps: int, num_steps: int) -> torch.Tensor:
        """Descending long tensor of distinct timesteps in [0, num_train_timesteps): num_steps of them,
        or for "leading" as many as RED-Diff's range(0, T, T // num_steps) holds (see the class docstring).

        Raises:
            ValueError: if num_steps is not in [1, num_train_timesteps].
        """
        T, N = int(num_train_timesteps), int(num_steps)
        if not 1 <= N <= T:
            raise ValueError(f"num_steps must be between 1 and the prior's {T} training timesteps, got {N}")
        if self.spacing == "linspace":
            ts = torch.linspace(T - 1, 0, N, dtype=torch.float64).round().long()
        elif self.spacing == "leading":
            ts = torch.arange(0, T, T // N, dtype=torch.long).flip(0)
        else:
            ts = torch.arange(T, 0, -T / N, dtype=torch.float64).round().long() - 1
        return ts

    def __repr__(self) -> str:
        return f"DDPMTimesteps(spacing={self.spacing!r})"


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """(T,) float64 linearly spaced betas (the DDPM / ADM / DPS training schedule by default)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


@dataclass(frozen=True)
class DDPMChain:
    """Schedule of the chain through timesteps t_0 < t_1 < ... < t_{N-1}; every field is (N,) float64.

    Index i is the position in the chain (i = 0 is the last denoising step); the "previous" time of
    step i is t_{i-1} (alpha_bar_prev = 1 for i = 0).
    """

    timesteps: torch.Tensor  # (N,) long, increasing
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    betas: torch.Tensor  # 1 - alpha_bar_i / alpha_bar_{i-1}
    posterior_variance: torch.Tensor  # beta_tilde_i = beta_i (1 - alpha_bar_{i-1}) / (1 - alpha_bar_i)
    posterior_log_variance_clipped: torch.Tensor  # log beta_tilde with entry 0 replaced by entry 1
    posterior_mean_coef1: torch.Tensor  # multiplies x_0 in the mean of q(x_{i-1} | x_i, x_0)
    posterior_mean_coef2: torch.Tensor  # multiplies x_i


def ddpm_chain(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | None = None) -> DDPMChain:
    """DDPM schedule of the (respaced) chain through `timesteps`.

    Args:
        alphas_cumprod: (T,) alpha_bar of the training schedule.
        timesteps: increasing long tensor of training timesteps to keep; None: all T.
    Returns:
        The DDPMChain; with all timesteps its betas equal the training betas.
    """
    ab_all = alphas_cumprod.detach().to("cpu", torch.float64)
    if timesteps is None:
        timesteps = torch.arange(ab_all.numel())
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).cpu()
    if timesteps.numel() > 1 and not bool((timesteps[1:] > timesteps[:-1]).all()):
        raise ValueError("ddpm_chain expects strictly increasing timesteps")
    ab = ab_all[timesteps]
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = 1.0 - ab / ab_prev
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    # post_var[0] = 0: use post_var[1] in its log (the noise of the last step is never added anyway)
    clipped = torch.cat([post_var[1:2], post_var[1:]]) if post_var.numel() > 1 else betas.clone()
    return DDPMChain(
        timesteps=timesteps,
        alphas_cumprod=ab,
        alphas_cumprod_prev=ab_prev,
        betas=betas,
        posterior_variance=post_var,
        posterior_log_variance_clipped=clipped.log(),
        posterior_mean_coef1=betas * ab_prev.sqrt() / (1.0 - ab),
        posterior_mean_coef2=(1.0 - ab_prev) * (1.0 - betas).sqrt() / (1.0 - ab),
    )
