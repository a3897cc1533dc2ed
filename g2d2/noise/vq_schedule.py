"""Schedule math of the VQ-Diffusion "mask-and-replace" forward process, as free functions.

Forward kernel from time s to time t > s (one token, K real codes, mask id K):
    q(z_t = z_s | z_s)            = a + b     (keep)
    q(z_t = j | z_s), j != z_s    = b         (uniform replacement, each of the other K-1 codes)
    q(z_t = mask | z_s)           = c
    q(z_t = mask | z_s = mask)    = 1         (the mask is absorbing)
with b = (1 - a - c) / K. The family is closed under composition, so the kernel between any two
times follows from the cumulative schedules of q(z_t | z_0) (alpha_bar, beta_bar, gamma_bar):
    a_{s->t} = alpha_bar_t / alpha_bar_s,   1 - c_{s->t} = (1 - gamma_bar_t) / (1 - gamma_bar_s).
Time -1 denotes the clean z_0 (alpha_bar = 1, gamma_bar = 0), matching diffusers'
VQDiffusionScheduler, whose times run t = 0 .. T-1 with t = 0 already one step away from z_0.

References: Gu et al., "Vector Quantized Diffusion Model for Text-to-Image Synthesis", CVPR 2022,
Sec. 3.1 and Eq. (11); diffusers' VQDiffusionScheduler (same schedules, same posterior).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from g2d2 import rng
from g2d2.rng import Generators

if TYPE_CHECKING:
    from g2d2.priors.base import DiscretePrior


def vq_diffusion_schedules(
    num_timesteps: int,
    num_codes: int,
    alpha_cum_start: float = 0.99999,
    alpha_cum_end: float = 0.000009,
    gamma_cum_start: float = 0.000009,
    gamma_cum_end: float = 0.99999,
) -> dict[str, torch.Tensor]:
    """The linear VQ-Diffusion schedules (Gu et al. Sec. 4.1; diffusers' defaults), in float64.

    Args:
        num_timesteps: T.
        num_codes: K, the number of real codes (the mask is not counted).
        alpha_cum_start, alpha_cum_end: alpha_bar at t = 0 and t = T-1 (linear in between).
        gamma_cum_start, gamma_cum_end: gamma_bar at t = 0 and t = T-1 (linear in between).
    Returns:
        dict with (T,) float64 tensors `log_cumprod_at`, `log_cumprod_bt`, `log_cumprod_ct`
        (cumulative, q(z_t | z_0)) and `log_at`, `log_bt`, `log_ct` (one step, q(z_t | z_{t-1})).
    """
    f64 = torch.float64
    att = torch.linspace(alpha_cum_start, alpha_cum_end, num_timesteps, dtype=f64)
    ctt = torch.linspace(gamma_cum_start, gamma_cum_end, num_timesteps, dtype=f64)
    btt = (1.0 - att - ctt) / num_codes
    att_prev = torch.cat([torch.ones(1, dtype=f64), att[:-1]])
    ctt_prev = torch.cat([torch.zeros(1, dtype=f64), ctt[:-1]])
    at = att / att_prev
    ct = 1.0 - (1.0 - ctt) / (1.0 - ctt_prev)
    bt = (1.0 - at - ct) / num_codes
    return {
        "log_cumprod_at": att.log(), "log_cumprod_bt": btt.log(), "log_cumprod_ct": ctt.log(),
        "log_at": at.log(), "log_bt": bt.log(), "log_ct": ct.log(),
    }


def log_kernel(prior: DiscretePrior, s: int, t: int) -> tuple[float, float, float]:
    """log (a, b, c) of the forward kernel q(z_t | z_s), for -1 <= s < t <= T-1 (s = -1: z_0).

    Computed in float64 from the prior's cumulative schedules; returns Python floats
    (b may be 0, then its log is -inf).
    """
    if not -1 <= s < t < prior.num_timesteps:
        raise ValueError(f"need -1 <= s < t < T={prior.num_timesteps}, got s={s}, t={t}")
    a_t = prior.log_cumprod_at[t].double().exp().item()
    c_t = prior.log_cumprod_ct[t].double().exp().item()
    a_s = 1.0 if s < 0 else prior.log_cumprod_at[s].double().exp().item()
    c_s = 0.0 if s < 0 else prior.log_cumprod_ct[s].double().exp().item()
    a = a_t / a_s
    c = 1.0 - (1.0 - c_t) / (1.0 - c_s)
    b = max(1.0 - a - c, 0.0) / prior.num_codes
    return _log(a), _log(b), _log(c)


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


def _logaddexp(x: float, y: float) -> float:
    hi, lo = max(x, y), min(x, y)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def log_transition_to(
    tokens: torch.Tensor,
    num_codes: int,
    log_abc: tuple[float, float, float],
    with_mask_row: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """log q(z_t = tokens | z_s = j) for every source class j, as a function of j.

    Args:
        tokens: (B, N) long z_t in [0, K] (K = mask).
        num_codes: K.
        log_abc: log (a, b, c) of the kernel q(z_t | z_s) (see `log_kernel`).
        with_mask_row: also return the row j = K (source = mask): 0 where z_t is the mask, else -inf.
        dtype: floating dtype of the result.
    Returns:
        (B, K, N), or (B, K+1, N) with the mask row.
    """
    log_a, log_b, log_c = log_abc
    k = num_codes
    is_mask = (tokens == k).unsqueeze(1)  # (B, 1, N)
    same = torch.nn.functional.one_hot(tokens.clamp(max=k - 1), k).permute(0, 2, 1).bool()  # (B, K, N)
    full = lambda v: torch.full((), v, dtype=dtype, device=tokens.device)
    out = torch.where(same, full(_logaddexp(log_a, log_b)), full(log_b))
    out = torch.where(is_mask, full(log_c), out)  # every code reaches the mask with prob. c
    if with_mask_row:
        out = torch.cat([out, torch.where(is_mask, full(0.0), full(-math.inf))], dim=1)
    return out


def markov_posterior_log_probs(
    prior: DiscretePrior, log_q_x0: torch.Tensor, tokens_t: torch.Tensor, t: int, s: int
) -> torch.Tensor:
    """log sum_{z0} q(z_s | z_t, z0) q(z0): the VQ-Diffusion reverse step from t to s (-1 < s < t).

    Same quantity as diffusers' `VQDiffusionScheduler.q_posterior` for s = t - 1, written for any
    earlier time s (exact, by closure of the kernel family) so that skipped timesteps stay exact.
    With q(z_s | z_t, z0) = q(z_t | z_s) q(z_s | z0) / q(z_t | z0):
        p(z_s = j) = q(z_t | z_s = j) * sum_k r_k q(z_s = j | z0 = k),   r_k = q(z0 = k) / q(z_t | z0 = k)
    and sum_k r_k q(z_s = j | z0 = k) = a_s r_j + b_s sum(r) for a code j, c_s sum(r) for the mask.

    Args:
        prior: gives K and the schedules.
        log_q_x0: (B, K, N) log q(z0) (normalised over K).
        tokens_t: (B, N) long, the current z_t.
        t, s: current and target times, 0 <= s < t.
    Returns:
        (B, K+1, N) log-probabilities of z_s (normalised up to rounding).
    """
    if not 0 <= s < t:
        raise ValueError(f"markov_posterior_log_probs needs 0 <= s < t, got s={s}, t={t}")
    k, dtype = prior.num_codes, log_q_x0.dtype
    # 1. log r_k = log q(z0 = k) - log q(z_t | z0 = k); impossible z0 (q = 0) get r = 0
    log_q_t_0 = log_transition_to(tokens_t, k, log_kernel(prior, -1, t), dtype=dtype)  # (B, K, N)
    log_r = torch.where(torch.isfinite(log_q_t_0), log_q_x0 - log_q_t_0, torch.full_like(log_q_x0, -math.inf))
    log_sum_r = torch.logsumexp(log_r, dim=1, keepdim=True)  # (B, 1, N)
    # 2. mix the normalised r through q(z_s | z0): a_s r_j + b_s (codes), c_s (mask)
    log_a_s, log_b_s, log_c_s = log_kernel(prior, -1, s)
    mixed = torch.logaddexp(log_r - log_sum_r + log_a_s, torch.full_like(log_r, log_b_s))
    mixed = torch.cat([mixed, torch.full_like(log_sum_r, log_c_s)], dim=1)  # (B, K+1, N)
    # 3. times q(z_t | z_s = j) and the normaliser sum(r)
    log_q_t_s = log_transition_to(tokens_t, k, log_kernel(prior, s, t), with_mask_row=True, dtype=dtype)
    return mixed + log_q_t_s + log_sum_r


def uniform(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """U[0, 1) float32 draws of `shape` (batch first) from `generator`, one generator or one per image (see
    g2d2.rng), on the generators' own device, then moved to `device`."""
    return rng.rand(shape, generator).to(device)


def gumbel(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) (u clamped away from 0), drawn as in `uniform`."""
    u = uniform(shape, generator, device).clamp_min_(torch.finfo(torch.float32).tiny)
    return u.log_().neg_().log_().neg_()  # in place: the inner loop draws a (B, K, N) tensor per iteration


def sample_categorical(log_probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Exact sample of Cat(softmax(log_probs)) along dim 1 by the Gumbel-max trick.

    Args:
        log_probs: (B, C, N) unnormalised log-probabilities (-inf allowed, not a whole column).
    Returns:
        (B, N) long class ids.
    """
    return (log_probs + gumbel(tuple(log_probs.shape), generator, log_probs.device)).argmax(dim=1)


def sample_categorical_icdf(log_probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Exact sample of Cat(softmax(log_probs)) along dim 1 by inverting the CDF.

    Same distribution as `sample_categorical`, but only one uniform per token (B * N draws instead of
    B * C * N), so little is drawn on the CPU generator and copied to the device.

    Args:
        log_probs: (B, C, N) unnormalised log-probabilities (-inf allowed, not a whole column).
    Returns:
        (B, N) long class ids.
    """
    batch, classes, n = log_probs.shape
    cdf = torch.cumsum(torch.softmax(log_probs.float(), dim=1), dim=1)  # (B, C, N)
    u = uniform((batch, 1, n), generator, log_probs.device) * cdf[:, -1:, :]
    # the first class whose cumulative mass exceeds u; classes of zero mass are never chosen
    index = (cdf <= u).sum(dim=1)
    return index.clamp_(max=classes - 1)


def top_p_filter(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep, per token, the smallest set of most likely classes whose mass reaches `top_p`.

    The most likely class is always kept; dropped classes get -inf. (B, C, N) -> (B, C, N), not
    renormalised (Gumbel-max sampling does not need it).
    """
    if top_p >= 1.0:
        return log_probs
    sorted_lp, order = torch.sort(log_probs, dim=1, descending=True)
    sorted_p = sorted_lp.softmax(dim=1)
    mass_before = torch.cumsum(sorted_p, dim=1) - sorted_p
    keep_sorted = mass_before < top_p  # the first class has mass_before = 0
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return log_probs.masked_fill(~keep, -math.inf)
