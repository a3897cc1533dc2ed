"""G2D2: gradient-guided discrete diffusion for linear inverse problems.

Murata, Saito, Lai, Takida, Uesaka, Mitsufuji, Ermon, "G2D2: Gradient-guided Discrete Diffusion
for image inverse problem solving", 2024 (arXiv:2410.14710, TMLR), and its public code sony/g2d2.

At each time t of a discrete (VQ-Diffusion) prior, a categorical variational posterior
q_alpha(z0) = prod_n Cat(softmax(alpha[:, n])) is fitted to
    p(z0 | z_t, y)  ~  p_theta(z0 | z_t) exp(-||y - A D(z0)||)
by minimising, with a continuous (Gumbel-softmax) relaxation of z0 and the relaxed VQ decode,
    ||y - A D(softmax((alpha + g) / tau)^T E)||_2 + lambda_i KL(q_alpha || p_theta(. | z_t)),
then the noise process (`StarShaped` or `MarkovPosterior`) moves to the next time with alpha*.
Only the VQ decoder and A are differentiated; the transformer runs once per step without grad.

Choices made here (documented deviations or readings of the reference):
- Timesteps: t_i = round(linspace(T, 0, S + 1)[1:]), i = 0 .. S-1 (all of T-1 .. 0 when S = T); the
  noise process jumps from t_i straight to t_{i+1} (exact kernel), and from t_{S-1} = 0 to z0.
- KL (`kl_form`, `kl_to_prior`), summed over tokens; losses are summed over the batch (images independent).
  "exact" (default): sum_k q_k (log q_k - pi_k) with q = softmax(alpha), log q = log_softmax(alpha), the
  true KL. "public": the public code's sum_k q_k (alpha_k - pi_k), alpha in place of log q. alpha is
  renormalised after every RAdam step (and initialised normalised), so where the loss is evaluated the
  two are equal in value, but not in gradient: d/d alpha_j of the public form is that of the exact one
  plus q_j (the exact form's -logsumexp(alpha) term, whose gradient is -q_j, is missing), i.e. the loss
  gradient carries an extra +lambda_i softmax(alpha)_j. This changes the optimisation, and the
  public presets (lr0, lambda0) were tuned with "public", so the paper-reproduction configs select it.
- Every draw of a solve (the inner loop's Gumbel noise and the re-noising) comes from generator(s)
  on the solve's device seeded once from the passed CPU generator(s) (`g2d2.rng.device_generator`;
  one per image makes image b's draws those of its solve alone): deterministic under the seeds, with
  no host-side draws and copies in the loop, but the numbers differ between CPU and CUDA runs.
- NaN/Inf: alpha* of every outer step is folded into a device-side flag (`FiniteGuard`; a NaN in any
  inner iterate persists in alpha through RAdam) that is read every `check_every` outer steps and at
  the end, so neither loop synchronises with the host in between.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from g2d2.noise.star import StarShaped
from g2d2.noise.vq_schedule import gumbel
from g2d2.operators.base import LinearOperator
from g2d2.priors.base import DiscretePrior
from g2d2.rng import Generators, device_generator
from g2d2.solvers.base import FiniteGuard, Solver, StepCallback, check_finite

logger = logging.getLogger(__name__)

#: accepted values of G2D2's `kl_form`
KL_FORMS = ("exact", "public")


def kl_to_prior(alpha: torch.Tensor, pi_t: torch.Tensor, form: str = "exact", dim: int = 1) -> torch.Tensor:
    """KL(q_alpha || p_theta(. | z_t)) per image, summed over tokens: alpha, pi_t (B, K, N) -> (B,) (`dim`, the
    codes' dimension: 1 for (B, K, N), 2 for the solver's (B, N, K)).

    form "exact": sum q (log_softmax(alpha) - pi_t), the true KL. form "public": sum q (alpha - pi_t), as
    in the public G2D2 code; equal in value when alpha is normalised (logsumexp over K = 0), with gradient
    d/d alpha = that of "exact" + softmax(alpha) (see the module docstring).
    """
    if form == "exact":
        log_q = torch.log_softmax(alpha, dim=dim)
        return (log_q.exp() * (log_q - pi_t)).sum(dim=(1, 2))
    if form == "public":
        return (torch.softmax(alpha, dim=dim) * (alpha - pi_t)).sum(dim=(1, 2))
    raise ValueError(f"kl_form must be one of {', '.join(KL_FORMS)}, got {form!r}")


class G2D2(Solver):
    """Gradient-guided discrete diffusion (the paper's algorithm; defaults = the SR x4 preset).

    Args:
        noise_schedule: `StarShaped` or `MarkovPosterior` (anything of kind "discrete" with `renoise`);
            None = `StarShaped()`.
        num_steps: S outer steps (paper: 100 = T; more than the prior's T runs all T timesteps).
        inner_iters: RAdam iterations per outer step (paper: 30).
        tau: Gumbel-softmax temperature (paper: 1.0).
        kappa: forget coefficient of the logits init, alpha = renorm(kappa pi_t + (1 - kappa) alpha_prev)
            (paper: 0.3; 1 = restart from the prior at every step).
        lr0: base learning rate (paper presets: Gaussian deblur 15, SR x4 10).
        lr_decay_w: w of lr_i = lr0 10^(w/2 - w i/(S-1)) (presets: deblur 1, SR x4 2).
        kl_weight0: lambda0 of lambda_i = lambda0 10^(v/2 - v i/(S-1)) (paper: 3e-4).
        kl_decay_v: v (paper: 2).
        kl_form: "exact" (the true KL, log_softmax(alpha) inside) or "public" (the public code's alpha in
            place of log_softmax(alpha): same value, gradient + lambda_i softmax(alpha)); see `kl_to_prior`.
    """

    prior_kind = "discrete"
    #: outer steps between the host reads of the NaN/Inf flag (see FiniteGuard)
    check_every = 10

    def __init__(
        self,
        noise_schedule: object | None = None,
        num_steps: int = 100,
        inner_iters: int = 30,
        tau: float = 1.0,
        kappa: float = 0.3,
        lr0: float = 10.0,
        lr_decay_w: float = 2.0,
        kl_weight0: float = 3e-4,
        kl_decay_v: float = 2.0,
        kl_form: str = "exact",
    ) -> None:
        noise_schedule = StarShaped() if noise_schedule is None else noise_schedule
        if getattr(noise_schedule, "kind", None) != "discrete" or not hasattr(noise_schedule, "renoise"):
            raise ValueError(
                f"G2D2 needs a discrete noise schedule (noise_schedule=star or markov), got "
                f"{type(noise_schedule).__name__}"
            )
        if num_steps < 1 or inner_iters < 0 or tau <= 0 or not 0.0 <= kappa <= 1.0:
            raise ValueError(
                f"G2D2 needs num_steps >= 1, inner_iters >= 0, tau > 0, 0 <= kappa <= 1; got {num_steps}, "
                f"{inner_iters}, {tau}, {kappa}"
            )
        if kl_form not in KL_FORMS:
            raise ValueError(f"G2D2 kl_form must be one of {', '.join(KL_FORMS)}, got {kl_form!r}")
        self.noise_schedule = noise_schedule
        self.num_steps, self.inner_iters = int(num_steps), int(inner_iters)
        self.tau, self.kappa = float(tau), float(kappa)
        self.lr0, self.lr_decay_w = float(lr0), float(lr_decay_w)
        self.kl_weight0, self.kl_decay_v = float(kl_weight0), float(kl_decay_v)
        self.kl_form = kl_form

    def timesteps(self, num_timesteps: int) -> list[int]:
        """t_i = round(linspace(T, 0, S+1)[1:]): S distinct descending times ending at 0.

        S = min(num_steps, T): asking for more steps than the prior has timesteps runs all T of them.
        """
        steps = min(self.num_steps, num_timesteps)
        if steps < self.num_steps:
            logger.warning(
                "num_steps=%d > T=%d of the prior: running all %d timesteps", self.num_steps, num_timesteps, steps
            )
        return [int(v) for v in np.round(np.linspace(num_timesteps, 0, steps + 1)[1:])]

    def step_sizes(self, num_steps: int | None = None) -> tuple[list[float], list[float]]:
        """(lr_i, lambda_i) for i = 0 .. S-1: log-linear from 10^(w/2) to 10^(-w/2) times lr0 (same for lambda)."""
        num_steps = self.num_steps if num_steps is None else num_steps
        exps_w = np.linspace(self.lr_decay_w / 2, -self.lr_decay_w / 2, num_steps)
        exps_v = np.linspace(self.kl_decay_v / 2, -self.kl_decay_v / 2, num_steps)
        return [self.lr0 * 10.0**e for e in exps_w], [self.kl_weight0 * 10.0**e for e in exps_v]

    def solve(
        self,
        prior: DiscretePrior,
        operator: LinearOperator,
        y: torch.Tensor,
        generator: Generators,
        progress: bool = False,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        if not isinstance(prior, DiscretePrior):
            raise TypeError(
                f"G2D2 needs a discrete prior (prior=tiny_vq or vq_diffusion_ithq), got {type(prior).__name__}"
            )
        device, batch = y.device, y.shape[0]
        times = self.timesteps(prior.num_timesteps)
        lrs, kl_weights = self.step_sizes(len(times))  # 4. log-linear lr_i and lambda_i schedules
        # every draw: a device generator seeded from the CPU generator (see module docstring)
        step_gen = device_generator(generator, device)
        guard = FiniteGuard("G2D2 variational logits alpha", self.check_every)

        # 0. start from the all-mask z_T
        tokens = torch.full((batch, prior.num_tokens), prior.mask_id, dtype=torch.long, device=device)
        alpha_prev: torch.Tensor | None = None
        for i, t in enumerate(tqdm(times, desc="G2D2", disable=not progress, leave=False)):
            # 1. prior prediction pi_t = log p_theta(z0 | z_t): (B, K, N), no grad, clamped at -70; kept as
            #    (B, N, K) (see _optimise)
            pi_t = prior.log_p_x0(tokens, t).transpose(1, 2).contiguous()
            # 2. init the variational logits: pi_t, then the forget-coefficient mixture with alpha*_{prev}
            if alpha_prev is None:
                init = pi_t
            else:
                init = torch.log_softmax(self.kappa * pi_t + (1.0 - self.kappa) * alpha_prev, dim=2)
            # 3. inner optimisation of the relaxed objective
            alpha = self._optimise(prior, operator, y, pi_t, init, lrs[i], kl_weights[i], step_gen)
            guard.update(alpha, i)
            alpha_prev = alpha
            # 5. re-noise with alpha* as log p(z0 | z_t, y): to the next time, or to z0 after t = 0
            s = times[i + 1] if i + 1 < len(times) else -1
            alpha_kn = alpha.transpose(1, 2)  # (B, K, N) view, as the noise schedules and callbacks take it
            tokens = self.noise_schedule.renoise(prior, alpha_kn.clamp(min=-70.0), tokens, t, s, step_gen)
            if callback is not None:
                callback(i, t, {"alpha": alpha_kn, "tokens": tokens})
        guard.finish()

        # 6. hard decode of the final clean tokens
        x = prior.decode_tokens(tokens)
        check_finite(x, "G2D2 reconstruction")
        return x.clamp(-1.0, 1.0)

    def _optimise(
        self,
        prior: DiscretePrior,
        operator: LinearOperator,
        y: torch.Tensor,
        pi_t: torch.Tensor,
        init: torch.Tensor,
        lr: float,
        kl_weight: float,
        generator: Generators,
    ) -> torch.Tensor:
        """Step 3 of the algorithm: fresh RAdam on alpha, returns the renormalised alpha*.

        Works in (B, N, K) (pi_t, init and the result too): every softmax / logsumexp then runs over the
        contiguous last dimension, and the relaxed decode gets probs as a transposed (B, K, N) view, which its
        batched matmul reads without a copy. Image b's Gumbel noise comes from its own generator (g2d2.rng).
        """
        alpha = init.detach().clone().requires_grad_(True)
        # foreach: the multi-tensor kernels, the same update in fewer passes over (B, K, N) (default only on CUDA)
        optimizer = torch.optim.RAdam([alpha], lr=lr, foreach=True)
        with torch.enable_grad():
            for _ in range(self.inner_iters):
                # 3a. one soft Gumbel-softmax sample per iteration (no straight-through)
                g = gumbel(tuple(alpha.shape), generator, alpha.device).add_(alpha)
                s = torch.softmax(g if self.tau == 1.0 else g / self.tau, dim=2)
                # 3b. relaxed decode and data term ||y - A x||_2 per image (plain norm)
                x = prior.decode(s.transpose(1, 2))
                data = (y - operator.forward(x)).flatten(1).norm(dim=1)  # (B,)
                # 3c. KL(q_alpha || p_theta(. | z_t)) summed over tokens, per image
                kl = kl_to_prior(alpha, pi_t, self.kl_form, dim=2)  # (B,)
                loss = (data + kl_weight * kl).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # 3d. renormalise alpha to log-probabilities
                with torch.no_grad():
                    alpha -= torch.logsumexp(alpha, dim=2, keepdim=True)
        return alpha.detach()
