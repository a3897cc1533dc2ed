"""The VQ-Diffusion schedule math and the two G2D2 re-noising processes, against diffusers'
VQDiffusionScheduler and against dense float64 transition matrices."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import VQDiffusionScheduler
from vq_toys import dense_kernel

from g2d2.noise import MarkovPosterior, StarShaped
from g2d2.noise.vq_schedule import (
    log_kernel,
    markov_posterior_log_probs,
    sample_categorical,
    sample_categorical_icdf,
    top_p_filter,
    vq_diffusion_schedules,
)

NAMES = ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct", "log_at", "log_bt", "log_ct")


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_prior(num_codes: int, num_timesteps: int, num_tokens: int = 16, **schedule) -> SimpleNamespace:
    """Just what the noise code reads from a DiscretePrior: sizes and schedules."""
    sched = vq_diffusion_schedules(num_timesteps, num_codes, **schedule)
    return SimpleNamespace(
        num_codes=num_codes, num_timesteps=num_timesteps, num_tokens=num_tokens, mask_id=num_codes, **sched
    )


def random_inputs(k: int, n: int, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    log_q = torch.log_softmax(3 * torch.randn(batch, k, n, generator=g), dim=1)
    tokens = torch.randint(0, k + 1, (batch, n), generator=g)  # codes and masks mixed
    return log_q, tokens


def test_schedules_match_diffusers():
    k, t = 4096, 100
    ours = vq_diffusion_schedules(t, k)
    ref = VQDiffusionScheduler(num_vec_classes=k + 1, num_train_timesteps=t)
    for name in NAMES:
        assert ours[name].dtype == torch.float64 and ours[name].shape == (t,)
        torch.testing.assert_close(ours[name].float(), getattr(ref, name)[:t], rtol=0, atol=1e-5)


def test_kernel_composes_like_the_per_step_chain():
    """q(z_t | z_s) from the cumulative schedules equals the product of the one-step matrices."""
    k, big_t = 5, 10
    prior = fake_prior(k, big_t, alpha_cum_start=0.95, alpha_cum_end=0.05, gamma_cum_start=0.02, gamma_cum_end=0.6)
    steps = [dense_kernel(k, (prior.log_at[t].item(), prior.log_bt[t].item(), prior.log_ct[t].item()))
             for t in range(big_t)]
    for s, t in [(-1, 0), (-1, 9), (0, 1), (2, 7), (4, 5), (0, 9)]:
        chain = torch.eye(k + 1, dtype=torch.float64)
        for u in range(s + 1, t + 1):
            chain = chain @ steps[u]
        torch.testing.assert_close(dense_kernel(k, log_kernel(prior, s, t)), chain, rtol=0, atol=1e-12)
    for t in range(big_t):  # one step = the per-step schedule; from -1 = the cumulative one
        assert log_kernel(prior, t - 1, t) == pytest.approx(
            (prior.log_at[t].item(), prior.log_bt[t].item(), prior.log_ct[t].item()), rel=1e-9)
        assert log_kernel(prior, -1, t) == pytest.approx(
            (prior.log_cumprod_at[t].item(), prior.log_cumprod_bt[t].item(), prior.log_cumprod_ct[t].item()), rel=1e-9)


@pytest.mark.parametrize("t", [99, 60, 17, 1])
def test_markov_step_equals_diffusers_step(t):
    """Same categorical probabilities as VQDiffusionScheduler.q_posterior, and the very same
    samples as VQDiffusionScheduler.step with an identically seeded generator."""
    k, n = 6, 40
    prior = fake_prior(k, 100, num_tokens=n)
    ref = VQDiffusionScheduler(num_vec_classes=k + 1, num_train_timesteps=100)
    log_q, tokens = random_inputs(k, n)
    ours = markov_posterior_log_probs(prior, log_q, tokens, t, t - 1)  # (B, K+1, N)
    theirs = ref.q_posterior(log_q, tokens, t)
    torch.testing.assert_close(ours.exp().sum(1), torch.ones(3, n), rtol=0, atol=1e-5)  # normalised
    torch.testing.assert_close(ours.softmax(1), theirs.softmax(1), rtol=0, atol=1e-5)
    for seed in range(3):
        mine = MarkovPosterior().renoise(prior, log_q, tokens, t, t - 1, torch.Generator().manual_seed(seed))
        step = ref.step(log_q, t, tokens, generator=torch.Generator().manual_seed(seed)).prev_sample
        assert torch.equal(mine, step)
    # revealed tokens are never masked again (the mask is absorbing in the forward process)
    assert not ((tokens < k) & (mine == k)).any()


def test_markov_last_step_samples_z0_like_diffusers():
    k, n = 6, 40
    prior = fake_prior(k, 100, num_tokens=n)
    ref = VQDiffusionScheduler(num_vec_classes=k + 1, num_train_timesteps=100)
    log_q, tokens = random_inputs(k, n, seed=3)
    mine = MarkovPosterior().renoise(prior, log_q, tokens, 0, -1, torch.Generator().manual_seed(7))
    assert torch.equal(mine, ref.step(log_q, 0, tokens, generator=torch.Generator().manual_seed(7)).prev_sample)
    assert mine.max() < k


@pytest.mark.parametrize("t, s", [(9, 3), (5, 4), (9, 0)])
def test_markov_jump_equals_dense_posterior(t, s):
    """sum_z0 q(z_s | z_t, z0) q(z0) with q(z_s | z_t, z0) = q(z_t | z_s) q(z_s | z0) / q(z_t | z0),
    from dense float64 matrices, for jumps over several steps (skipped timesteps)."""
    k, n = 4, 30
    prior = fake_prior(k, 10, num_tokens=n, alpha_cum_start=0.9, alpha_cum_end=0.1, gamma_cum_end=0.7)
    log_q, tokens = random_inputs(k, n, seed=1)
    q_t_s, q_s_0, q_t_0 = (dense_kernel(k, log_kernel(prior, a, b)) for a, b in [(s, t), (-1, s), (-1, t)])
    q0 = log_q.double().exp()  # (B, K, N)
    post = torch.einsum("bkn,js,kj,ks->bjns", q0, q_t_s, q_s_0[:k], 1 / q_t_0[:k])  # s indexes z_t
    expected = post.gather(3, tokens[:, None, :, None].expand(-1, k + 1, -1, 1)).squeeze(3)  # (B, K+1, N)
    ours = markov_posterior_log_probs(prior, log_q.double(), tokens, t, s).exp()
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_star_masks_exactly_the_schedule_count():
    """m_s = floor(N gamma_bar_s) masks per image at every time (diffusers' gamma_bar), none at s = -1;
    for ITHQ (K = 4096, N = 1024) the reference's floor(N (gamma_bar - beta_bar)) is the same number."""
    k, n = 4096, 1024
    prior = fake_prior(k, 100, num_tokens=n)
    ref = VQDiffusionScheduler(num_vec_classes=k + 1, num_train_timesteps=100)
    log_q = torch.zeros(2, k, n)  # uniform over codes
    star, g = StarShaped(top_p=1.0), torch.Generator().manual_seed(0)
    for s in [98, 70, 31, 5, 0]:
        z = star.renoise(prior, log_q, None, s + 1, s, g)
        expected = math.floor(n * math.exp(ref.log_cumprod_ct[s].item()))
        assert (z == k).sum(1).tolist() == [expected, expected]
    for s in range(100):
        c, b = prior.log_cumprod_ct[s].exp().item(), prior.log_cumprod_bt[s].exp().item()
        assert star.num_masked(prior, s) == math.floor(n * (c - b)) == math.floor(n * c)
    assert (star.renoise(prior, log_q, None, 0, -1, g) < k).all()


def test_star_marginal_matches_forward_process():
    """Unmasked tokens follow q(z_s | z0) given not masked, mask positions are uniform, for a
    schedule with a large uniform-replacement probability (K beta_bar_s = 0.3)."""
    k, n, s = 4, 20000, 5
    prior = fake_prior(k, 10, num_tokens=n, alpha_cum_start=0.9, alpha_cum_end=0.1,
                       gamma_cum_start=0.05, gamma_cum_end=0.45)
    q0 = torch.tensor([0.7, 0.2, 0.1, 0.0])
    log_q = q0.clamp_min(1e-30).log()[None, :, None].expand(1, k, n)
    z = StarShaped(top_p=1.0).renoise(prior, log_q, None, s + 1, s, torch.Generator().manual_seed(0))[0]
    q_s_0 = dense_kernel(k, log_kernel(prior, -1, s))[:k]  # (K, K+1)
    marginal = q0.double() @ q_s_0
    unmasked = z[z < k]
    freq = torch.bincount(unmasked, minlength=k).double() / unmasked.numel()
    torch.testing.assert_close(freq, marginal[:k] / marginal[:k].sum(), rtol=0, atol=0.015)  # 4 sigma
    # mask positions: over 200 draws on 10 tokens, every position is masked about m/N of the time
    small = fake_prior(k, 10, num_tokens=10)
    g = torch.Generator().manual_seed(1)
    masks = torch.stack([StarShaped().renoise(small, log_q[..., :10], None, 9, 8, g)[0] == k for _ in range(400)])
    rate = StarShaped().num_masked(small, 8) / 10
    assert (masks.double().mean(0) - rate).abs().max() < 0.1  # binomial std 0.025 at 400 draws


def test_top_p_keeps_the_smallest_set_reaching_p():
    log_p = torch.tensor([0.1, 0.5, 0.1, 0.3]).log()[None, :, None]
    kept = torch.isfinite(top_p_filter(log_p, 0.85))[0, :, 0].tolist()
    assert kept == [True, True, False, True] or kept == [False, True, True, True]  # one of the tied 0.1s
    assert torch.isfinite(top_p_filter(log_p, 0.2))[0, :, 0].tolist() == [False, True, False, False]
    assert torch.equal(top_p_filter(log_p, 1.0), log_p)


def test_gumbel_max_sampling_is_exact_and_seeded():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    log_p = probs.log()[None, :, None].expand(1, 4, 40000)
    z = sample_categorical(log_p, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.bincount(z[0], minlength=4) / 40000.0, probs, rtol=0, atol=0.01)
    assert torch.equal(z, sample_categorical(log_p, torch.Generator().manual_seed(0)))


def test_inverse_cdf_sampling_is_exact_and_seeded():
    probs = torch.tensor([0.6, 0.0, 0.25, 0.1, 0.05, 0.0])
    log_p = probs.log()[None, :, None].expand(2, 6, 40000)
    z = sample_categorical_icdf(log_p, torch.Generator().manual_seed(0))
    assert z.shape == (2, 40000)
    freq = torch.bincount(z.flatten(), minlength=6) / z.numel()
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.01)
    assert freq[1] == 0 and freq[5] == 0  # zero-mass classes are never drawn
    assert torch.equal(z, sample_categorical_icdf(log_p, torch.Generator().manual_seed(0)))


def test_invalid_arguments_are_rejected():
    prior = fake_prior(4, 10)
    with pytest.raises(ValueError, match="top_p"):
        StarShaped(top_p=0.0)
    with pytest.raises(ValueError, match="s < t"):
        log_kernel(prior, 5, 5)
    with pytest.raises(ValueError, match="s < t"):
        MarkovPosterior().renoise(prior, torch.zeros(1, 4, 16), torch.zeros(1, 16, dtype=torch.long), 3, 3,
                                  torch.Generator())
