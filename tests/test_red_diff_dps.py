"""RED-Diff and DPS on an analytic prior whose posterior is known in closed form.

Data x ~ N(m, Sigma) on 8 x 8 RGB images (Sigma: a smooth spatial kernel times a channel
correlation, marginal std 0.3). The exact noise-prediction network is known:
    eps*(x_t, t) = sqrt(1 - ab) (ab Sigma + (1 - ab) I)^-1 (x_t - sqrt(ab) m)
(for Sigma = s^2 I this is (x_t - sqrt(ab) m) sqrt(1 - ab) / (ab s^2 + 1 - ab)). With a linear operator
A and noise sigma the posterior is Gaussian with mean m + Sigma A^T (A Sigma A^T + sigma^2 I)^-1 (y - A m),
which is also the MAP. The pseudo-inverse ignores the prior, so it is far from that mean.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from g2d2.noise.ddpm import DDPMTimesteps, ddpm_chain, linear_betas
from g2d2.operators.base import LinearOperator
from g2d2.priors.base import PixelPrior
from g2d2.rng import device_generator
from g2d2.solvers._pixel import randn_like
from g2d2.solvers.base import NonFiniteError
from g2d2.solvers.dps import DPS
from g2d2.solvers.red_diff import REDDiff

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, SIGMA = 8, 0.05


class GaussianPrior(PixelPrior):
    """The exact eps-prediction of N(mean, cov) data under the linear-beta DDPM (T = 1000)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        super().__init__()
        self.image_size, self.learned_variance, self.num_train_timesteps = mean.shape[-1], False, 1000
        self.alphas_cumprod = torch.cumprod(1 - linear_betas(), 0)
        self.mean = mean.reshape(-1).double()
        self.lam, self.U = torch.linalg.eigh(cov.double())

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        ab = self.alphas_cumprod[int(t)]
        d = x_t.reshape(x_t.shape[0], -1).double() - ab.sqrt() * self.mean
        e = ((d @ self.U) * ((1 - ab).sqrt() / (ab * self.lam + 1 - ab))) @ self.U.T
        return e.reshape(x_t.shape).to(x_t.dtype)

    def predict(self, x_t, t):
        return self.eps(x_t, t), None


class Mask(LinearOperator):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask.shape[-1])
        self.mask = mask

    def forward(self, x):
        return x * self.mask

    adjoint = pinv = forward


class AvgPool2(LinearOperator):
    def forward(self, x):
        return F.avg_pool2d(x, 2)

    def adjoint(self, y):
        return F.interpolate(y, scale_factor=2, mode="nearest") / 4

    def pinv(self, y):
        return F.interpolate(y, scale_factor=2, mode="nearest")


def gaussian_problem(task: str, seed: int = 0):
    """(prior, operator, x, y, posterior mean, posterior covariance) of one 8 x 8 RGB problem."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * SIZE * SIZE
    ii, jj = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    pos = torch.stack([ii.flatten(), jj.flatten()], 1).double()
    spatial = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * 1.5**2))
    channels = torch.tensor([[1, 0.8, 0.7], [0.8, 1, 0.8], [0.7, 0.8, 1]], dtype=torch.float64)
    cov = 0.09 * torch.kron(channels, spatial) + 1e-4 * torch.eye(n, dtype=torch.float64)
    mean = torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64).view(3, 1, 1).expand(3, SIZE, SIZE)
    x = (mean.reshape(-1) + torch.linalg.cholesky(cov) @ torch.randn(n, generator=g, dtype=torch.float64))
    x = x.reshape(1, 3, SIZE, SIZE)
    op = Mask((torch.rand(1, 1, SIZE, SIZE, generator=g) > 0.5).float()) if task == "inpaint" else AvgPool2(SIZE)
    A = torch.stack([op.forward(e.reshape(1, 3, SIZE, SIZE)).reshape(-1) for e in torch.eye(n, dtype=torch.float64)], 1)
    y = op.forward(x) + SIGMA * torch.randn(op.forward(x).shape, generator=g, dtype=torch.float64)
    gram = A @ cov @ A.T + SIGMA**2 * torch.eye(A.shape[0], dtype=torch.float64)
    post_mean = mean.reshape(-1) + cov @ A.T @ torch.linalg.solve(gram, y.reshape(-1) - A @ mean.reshape(-1))
    post_cov = cov - cov @ A.T @ torch.linalg.solve(gram, A @ cov)
    return GaussianPrior(mean, cov), op, x, y.float(), post_mean.reshape(x.shape), post_cov


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().item()


def test_gaussian_prior_matches_isotropic_closed_form() -> None:
    s, m = 0.4, 0.1
    prior = GaussianPrior(torch.full((3, 4, 4), m), s**2 * torch.eye(48))
    x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for t in (0, 300, 999):
        ab = prior.alphas_cumprod[t]
        expected = (x_t - ab.sqrt() * m) * (1 - ab).sqrt() / (ab * s**2 + 1 - ab)
        torch.testing.assert_close(prior.eps(x_t, t), expected)


# Tolerances. Both solvers are approximations of the posterior, so we ask for a big step from the
# pseudo-inverse towards the posterior mean, not equality: the distance to the posterior mean must
# fall below 15 % of the pseudo-inverse's distance (measured: RED-Diff 4-5 %, DPS mean of 16 samples
# 1-4 %). DPS draws samples, so a single one is compared in MSE to the ground truth: within 1.5x of
# an exact posterior sampler's expected error, mse(post_mean, x) + tr(Sigma_post) / n (measured
# 0.8-0.85x: DPS is under-dispersed), and below the pseudo-inverse's error.


@pytest.mark.parametrize("task", ["inpaint", "avgpool"])
def test_red_diff_approaches_posterior_mean(task: str) -> None:
    prior, op, x, y, post_mean, _ = gaussian_problem(task)
    pinv = op.pinv(y)
    # lr 0.02 instead of the public 0.1: at small t the denoiser residual is mostly noise and Adam's
    # normalised steps keep mu jittering by about lr; 0.1 is tuned for 256 px images, not 8 x 8 ones
    x_hat = REDDiff(num_steps=500, lr=0.02).solve(prior, op, y, generator=torch.Generator().manual_seed(1))
    assert x_hat.shape == x.shape and x_hat.abs().max() <= 1
    assert mse(x_hat, post_mean) < 0.15 * mse(pinv, post_mean)
    assert mse(x_hat, x) < mse(pinv, x)


@pytest.mark.parametrize("task,scale", [("inpaint", 0.5), ("avgpool", 0.3)])
def test_dps_samples_centre_on_posterior_mean(task: str, scale: float) -> None:
    prior, op, x, y, post_mean, post_cov = gaussian_problem(task)
    pinv = op.pinv(y)
    batch = 16
    samples = DPS(num_steps=300, scale=scale).solve(
        prior, op, y.expand(batch, *y.shape[1:]).contiguous(), generator=torch.Generator().manual_seed(1)
    )
    assert samples.shape == (batch, *x.shape[1:])
    assert mse(samples.mean(0, keepdim=True), post_mean) < 0.15 * mse(pinv, post_mean)
    per_sample = sum(mse(s[None], x) for s in samples) / batch
    exact_sampler = mse(post_mean, x) + post_cov.trace().item() / post_cov.shape[0]
    assert per_sample < 1.5 * exact_sampler
    assert per_sample < mse(pinv, x)


@pytest.mark.parametrize("steps", [20, 100])
def test_dps_without_guidance_is_the_exact_ancestral_sampler(steps: int) -> None:
    """scale = 0 leaves the respaced DDPM ancestral sampler. For Gaussian data each eigen-direction
    (prior variance lam) follows a linear recursion, so the variance of its output is known exactly:
    v_{i-1} = (c1_i k_i + c2_i)^2 v_i + beta_tilde_i, k_i = sqrt(ab_i) lam / (ab_i lam + 1 - ab_i), v_N = 1
    (below the prior's 0.09: fixed small variances under-disperse, the more so with fewer steps)."""
    prior, op, *_ = gaussian_problem("avgpool")
    chain = ddpm_chain(prior.alphas_cumprod, DDPMTimesteps().timesteps(1000, steps).flip(0))
    var = torch.ones_like(prior.lam)
    for i in range(steps - 1, -1, -1):
        ab = chain.alphas_cumprod[i]
        gain = chain.posterior_mean_coef1[i] * ab.sqrt() * prior.lam / (ab * prior.lam + 1 - ab)
        var = (gain + chain.posterior_mean_coef2[i]) ** 2 * var + (chain.posterior_variance[i] if i > 0 else 0)
    y = torch.zeros(256, 3, SIZE // 2, SIZE // 2)
    samples = DPS(num_steps=steps, scale=0.0).solve(prior, op, y, generator=torch.Generator().manual_seed(3))
    # 256 samples: the pixel-averaged sample variance is within a few % (measured -3 % .. +2 %)
    assert abs(samples.double().var(0).mean().item() / var.mean().item() - 1) < 0.06
    assert mse(samples.mean(0), prior.mean.reshape(3, SIZE, SIZE)) < 4 * 0.09 / 256


@pytest.mark.parametrize("make", [lambda: REDDiff(num_steps=20, lr=0.05), lambda: DPS(num_steps=20)])
def test_seeded_runs_are_deterministic(make) -> None:
    prior, op, _, y, _, _ = gaussian_problem("inpaint")
    a, b, c = (make().solve(prior, op, y, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# RED-Diff at N = 5 visits 5 timesteps and updates at the first 4 (the last update is discarded, as published)
@pytest.mark.parametrize("make,last", [(lambda: REDDiff(num_steps=5), 3), (lambda: DPS(num_steps=5), 4)])
def test_nan_is_reported(make, last: int) -> None:
    prior, op, _, y, _, _ = gaussian_problem("inpaint")
    prior.eps = lambda x_t, t: torch.full_like(x_t, float("nan"))
    prior.predict = lambda x_t, t: (prior.eps(x_t, t), None)
    with pytest.raises(NonFiniteError, match=f"between steps 0 and {last}"):
        make().solve(prior, op, y, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [lambda: REDDiff(num_steps=6), lambda: DPS(num_steps=6)])
def test_per_step_noise_is_not_drawn_from_the_cpu_generator(make) -> None:
    # the solve takes one seed from the CPU generator and draws every step's noise on the solve's device
    prior, op, _, y, _, _ = gaussian_problem("inpaint")
    generator, reference = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    make().solve(prior, op, y, generator=generator)
    torch.randint(0, 2**62, (1,), generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def public_red_diff(prior, op, y, num_steps: int, lr: float, generator: torch.Generator):
    """NVlabs RED-diff's REDDIFF.sample for one image, transcribed (algos/reddiff.py, defaults of
    _configs/algo/reddiff.yaml: linear weighting, sigma_x0 = 0, awd) with our noise source, and the grid of
    utils/functions.py get_timesteps. Returns (what main.py saves: x0_pred, the mean after the last step)."""
    T = prior.num_train_timesteps
    ts = list(range(0, T, T // num_steps))
    noise_gen = device_generator(generator, y.device)
    mu = op.pinv(y).detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for ti in reversed(ts):
        ab = float(prior.alphas_cumprod[ti])
        noise_xt = randn_like(mu, noise_gen)
        x0_pred = mu.clone()  # mu + sigma_x0 * noise_x0 with sigma_x0 = 0
        xt = ab**0.5 * x0_pred + (1 - ab) ** 0.5 * noise_xt
        et = prior.eps(xt.detach(), ti).detach()
        loss_obs = ((y - op.forward(x0_pred)) ** 2).mean() / 2
        loss_noise = torch.mul((et - noise_xt).detach(), x0_pred).mean()
        loss = 0.25 * ((1 - ab) ** 0.5 / ab**0.5) * loss_noise + 1.0 * loss_obs
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return x0_pred.detach().clamp(-1, 1), mu.detach().clamp(-1, 1)


@pytest.mark.parametrize("num_steps", [7, 50])
def test_red_diff_returns_the_public_codes_estimate(num_steps: int) -> None:
    """The public code saves x0_pred, the mean before its last Adam step, after visiting range(0, T, T // N)
    (N = 7: 8 timesteps, 994, 852, ..., 0)."""
    prior, op, _, y, _, _ = gaussian_problem("avgpool")
    x_hat = REDDiff(num_steps=num_steps, lr=0.1).solve(prior, op, y, generator=torch.Generator().manual_seed(4))
    published, after_last_step = public_red_diff(prior, op, y, num_steps, 0.1, torch.Generator().manual_seed(4))
    torch.testing.assert_close(x_hat, published, rtol=0, atol=1e-6)
    assert (after_last_step - published).abs().max() > 1e-3  # the last step does move the mean


class SharedNoise:
    """Stands in for randn_like: step k's noise is one fixed (C, H, W) field for every image of the batch,
    so a batch and the single-image runs of its images see the same noise."""

    def __init__(self, steps: int) -> None:
        self.bank = torch.randn(steps, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
        self.calls = 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        return self.bank[self.calls - 1].expand_as(x).to(x.dtype)


def test_red_diff_batch_of_two_equals_two_single_runs(monkeypatch) -> None:
    """Each image's loss is its own mean, summed over the batch: Adam then moves each image exactly as in a
    run of its own, whatever its batch-mates (the public code's batch mean would divide every gradient by B)."""
    problems = [gaussian_problem("avgpool", seed) for seed in (0, 1)]
    prior, op = problems[0][0], problems[0][1]
    ys = [p[3] for p in problems]
    runs = []
    for batch in ([ys[0]], [ys[1]], ys):
        monkeypatch.setattr("g2d2.solvers.red_diff.randn_like", SharedNoise(60))
        solver = REDDiff(num_steps=50, lr=0.1)
        runs.append(solver.solve(prior, op, torch.cat(batch), generator=torch.Generator().manual_seed(0)))
    single = torch.cat(runs[:2])
    torch.testing.assert_close(runs[2], single, rtol=0, atol=1e-6)
    assert (single[0] - single[1]).abs().max() > 0.1  # two different problems, two different answers
