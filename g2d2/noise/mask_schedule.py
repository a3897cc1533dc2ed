"""Masking schedules of masked generative transformers (MaskGIT / MUSE / aMUSEd) as the cumulative
schedules of an absorbing discrete diffusion, so that `StarShaped` and `MarkovPosterior` use them
unchanged.

An absorbing process keeps a token or masks it, never replaces it by another code:
    q(z_t = z_0 | z_0) = alpha_bar_t = 1 - gamma_bar_t,   q(z_t = mask | z_0) = gamma_bar_t,   beta_bar_t = 0,
which is VQ-Diffusion's mask-and-replace family with the uniform part switched off (see `vq_schedule`).

aMUSEd's time grid (diffusers' `AmusedScheduler`, `set_timesteps(T)`): timesteps T-1, ..., 0; the step at
timestep t (step index i = T-1-t) leaves floor(N * m((i+1)/T)) tokens masked, where m is the masking
schedule, m(r) = cos(r pi / 2) ("cosine", the default) or 1 - r ("linear"). That output is the input of
timestep t-1, so the input of timestep t has mask ratio
    gamma_bar_t = m((T-1-t) / T),   t = 0 .. T-1   (gamma_bar_{T-1} = m(0) = 1: all masked),
and after the step at t = 0 every token is revealed (the clean z_0, time -1 here as in `vq_schedule`).

References: Chang et al., "MaskGIT: Masked Generative Image Transformer", CVPR 2022 (Sec. 3.2, cosine
schedule); Patil et al., "aMUSEd: An Open MUSE Reproduction", 2024; diffusers' AmusedScheduler.
"""

from __future__ import annotations

import math

import torch

#: the masking schedules AmusedScheduler accepts
MASKING_SCHEDULES = ("cosine", "linear")


def amused_mask_ratios(num_timesteps: int, masking_schedule: str = "cosine") -> torch.Tensor:
    """gamma_bar_t, the masked fraction of the input of timestep t = 0 .. T-1, as AmusedScheduler computes it.

    The ratio r = (i + 1) / T and m(r) are evaluated with AmusedScheduler's own float32 torch operations
    (long step index / int, then torch.cos), so floor(N gamma_bar) equals the scheduler's mask count for
    token counts whose product with a float32 is exact (powers of two, e.g. aMUSEd's 256 and 1024 tokens).

    Returns:
        (T,) float64 (the float32 values, widened).
    """
    if masking_schedule not in MASKING_SCHEDULES:
        raise ValueError(f"masking_schedule must be one of {MASKING_SCHEDULES}, got {masking_schedule!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    # the input of timestep t is the output of step index i = T-2-t, i.e. ratio (i + 1) / T = (T-1-t) / T
    steps_done = torch.arange(num_timesteps - 1, -1, -1)  # (T,) long, T-1-t for t = 0 .. T-1
    ratio = steps_done / num_timesteps  # float32, as (step_idx + 1) / len(timesteps) in the scheduler
    mask_ratio = torch.cos(ratio * math.pi / 2) if masking_schedule == "cosine" else 1 - ratio
    return mask_ratio.double()


def absorbing_schedules(gamma_bar: torch.Tensor) -> dict[str, torch.Tensor]:
    """The six log-schedules of `DiscretePrior` for an absorbing process with masked fraction gamma_bar.

    Args:
        gamma_bar: (T,) float64, non-decreasing in t, in [0, 1].
    Returns:
        dict with (T,) float64 `log_cumprod_at` = log(1 - gamma_bar), `log_cumprod_bt` = -inf (no uniform
        replacement), `log_cumprod_ct` = log gamma_bar, and the one-step `log_at`, `log_bt`, `log_ct`
        (q(z_t | z_{t-1}), with z_{-1} = z_0), as `vq_diffusion_schedules` returns them.
    """
    ctt = gamma_bar.double()
    if ctt.ndim != 1 or (ctt < 0).any() or (ctt > 1).any() or (ctt.diff() < 0).any():
        raise ValueError("gamma_bar must be a 1-d non-decreasing tensor in [0, 1]")
    att = 1.0 - ctt
    ctt_prev = torch.cat([torch.zeros(1, dtype=torch.float64), ctt[:-1]])
    att_prev = 1.0 - ctt_prev
    at = torch.where(att_prev > 0, att / att_prev.clamp_min(1e-300), torch.zeros_like(att))
    ct = 1.0 - at
    minus_inf = torch.full_like(ctt, -math.inf)
    return {
        "log_cumprod_at": att.log(), "log_cumprod_bt": minus_inf, "log_cumprod_ct": ctt.log(),
        "log_at": at.log(), "log_bt": minus_inf.clone(), "log_ct": ct.log(),
    }
