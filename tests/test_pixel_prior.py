"""DDPMPrior loading (diffusers layouts, strictness, clear errors), learned variance, DDPM time grids, configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_config
from diffusers import DDPMScheduler, UNet2DModel
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from g2d2.noise.ddpm import DDPMTimesteps, ddpm_chain, linear_betas
from g2d2.priors.checkpoints import EMBEDDED_DIR, CheckpointError
from g2d2.priors.pixel import DDPMPrior
from g2d2.solvers.dps import DPS, respaced_log_variance
from g2d2.solvers.red_diff import REDDiff

pytestmark = pytest.mark.usefixtures("one_thread")


class Identity16:
    """Denoising operator on 16 px images (the smallest operator a solver needs)."""

    image_shape = (3, 16, 16)

    def forward(self, x):
        return x

    adjoint = pinv = forward


def tiny_unet(out_channels: int = 3) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=out_channels, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, norm_num_groups=8,
    )


def save_tiny(root, layout: str = "subfolders", out_channels: int = 3, **scheduler_kw) -> UNet2DModel:
    """Save a tiny UNet + DDPMScheduler as our embedded prior ('subfolders') or a hub DDPM repo ('root')."""
    unet = tiny_unet(out_channels)
    unet_dir, sched_dir = (root / "unet", root / "scheduler") if layout == "subfolders" else (root, root)
    unet.save_pretrained(unet_dir)
    DDPMScheduler(num_train_timesteps=1000, **scheduler_kw).save_pretrained(sched_dir)
    return unet


@pytest.mark.parametrize("layout", ["subfolders", "root"])
def test_diffusers_layouts_load_and_run_solver_steps(tmp_path, layout: str) -> None:
    unet = save_tiny(tmp_path, layout)
    prior = DDPMPrior(str(tmp_path))
    assert prior.image_size == 16 and prior.num_train_timesteps == 1000 and not prior.learned_variance
    assert prior.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(prior.alphas_cumprod, torch.cumprod(1 - linear_betas(), 0), rtol=0, atol=0)
    assert not any(p.requires_grad for p in prior.parameters()) and not prior.training
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = unet.eval()(x, torch.tensor([10, 10])).sample
    torch.testing.assert_close(prior.eps(x, 10), ref)
    eps, log_var = prior.predict(x, torch.tensor([10, 700]))
    assert log_var is None and eps.shape == x.shape
    y = x.clamp(-1, 1)
    for solver in (REDDiff(num_steps=1), DPS(num_steps=2)):
        out = solver.solve(prior, Identity16(), y, generator=torch.Generator().manual_seed(0))
        assert out.shape == y.shape and torch.isfinite(out).all() and out.abs().max() <= 1


def test_learned_range_variance_and_v_prediction(tmp_path) -> None:
    unet = save_tiny(tmp_path, out_channels=6, variance_type="learned_range", prediction_type="v_prediction")
    prior = DDPMPrior(str(tmp_path))
    assert prior.learned_variance
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 999])
    eps, log_var = prior.predict(x, t)
    with torch.no_grad():
        out = unet.eval()(x, t).sample
    ab = prior.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, (1 - ab).sqrt() * x + ab.sqrt() * out[:, :3])  # v -> eps
    chain = ddpm_chain(prior.alphas_cumprod)
    frac = (out[:, 3:].double() + 1) / 2
    lo = chain.posterior_log_variance_clipped[t].view(-1, 1, 1, 1)
    hi = torch.log(linear_betas()[t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(log_var.double(), frac * hi + (1 - frac) * lo, rtol=0, atol=1e-5)
    # DPS on a respaced chain re-expresses the learned variance on the respaced betas
    out = DPS(num_steps=5).solve(prior, Identity16(), x.clamp(-1, 1), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_respaced_log_variance_keeps_the_interpolation_fraction() -> None:
    ab = torch.cumprod(1 - linear_betas(), 0)
    full = ddpm_chain(ab)
    ts = DDPMTimesteps().timesteps(1000, 50).flip(0)
    chain = ddpm_chain(ab, ts)
    torch.testing.assert_close(torch.cumprod(1 - chain.betas, 0), ab[ts], rtol=1e-12, atol=0)
    for i in (1, 10, 49):
        t = int(ts[i])
        for frac in (0.0, 0.3, 1.0):
            lo, hi = full.posterior_log_variance_clipped[t], full.betas[t].log()
            log_var = torch.full((1, 3, 2, 2), float(frac * hi + (1 - frac) * lo), dtype=torch.float64)
            new = respaced_log_variance(log_var, t, full, chain, i)
            expected = frac * chain.betas[i].log() + (1 - frac) * chain.posterior_log_variance_clipped[i]
            torch.testing.assert_close(new, torch.full_like(new, float(expected)), rtol=0, atol=1e-9)
    # the full chain reproduces the training schedule
    torch.testing.assert_close(full.betas, linear_betas(), rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "spacing,expected",
    [("linspace", [9, 6, 3, 0]), ("leading", [8, 6, 4, 2, 0]), ("trailing", [9, 7, 4, 1])],
)
def test_ddpm_timesteps(spacing: str, expected: list[int]) -> None:
    grid = DDPMTimesteps(spacing)
    assert grid.timesteps(10, 4).tolist() == expected
    assert grid.timesteps(10, 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="num_steps"):
        grid.timesteps(10, 11)
    with pytest.raises(ValueError, match="linspace"):
        DDPMTimesteps("cosine")


def test_wrong_paths_and_layouts_are_clear_errors(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere"):
        DDPMPrior(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty.*unet/config.json"):
        DDPMPrior(str(tmp_path / "empty"))
    tiny_unet().save_pretrained(tmp_path / "nosched" / "unet")
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        DDPMPrior(str(tmp_path / "nosched"))
    with pytest.raises(CheckpointError, match="embedded prior 'no_such_prior'"):
        DDPMPrior("embedded:no_such_prior")
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"weights.ckpt.*\.pt"):
        DDPMPrior(str(tmp_path / "weights.ckpt"))
    # 6 output channels but a fixed-variance scheduler: the layout does not fit
    save_tiny(tmp_path / "mismatch", out_channels=6)
    with pytest.raises(CheckpointError, match="output channels"):
        DDPMPrior(str(tmp_path / "mismatch"))


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_mismatched_weights_are_refused(tmp_path, change: str) -> None:
    save_tiny(tmp_path)
    file = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    if change == "missing":
        del state["conv_out.weight"]
    else:
        state["extra_head.weight"] = torch.zeros(3)
    save_file(state, file)
    with pytest.raises(CheckpointError, match="partly random") as err:
        DDPMPrior(str(tmp_path))
    assert ("conv_out.weight" if change == "missing" else "extra_head.weight") in str(err.value)


def test_precision_and_bad_precision(tmp_path) -> None:
    save_tiny(tmp_path)
    prior = DDPMPrior(str(tmp_path), precision="bf16")
    assert prior.unet.dtype == torch.bfloat16
    x = torch.randn(1, 3, 16, 16)
    eps32 = DDPMPrior(str(tmp_path)).eps(x, 500)
    eps = prior.eps(x, 500)
    assert eps.dtype == torch.float32 and (eps - eps32).abs().max() < 0.1 * eps32.abs().max()
    with pytest.raises(ValueError, match="fp16"):
        DDPMPrior(str(tmp_path), precision="fp8")


def test_mixed_precision_keeps_fp32_weights_and_computes_in_bf16(tmp_path) -> None:
    """precision=amp_bf16: the UNet's convolutions run in bf16 on float32 weights; eps is float32,
    close to the fp32 prior's, and differentiable w.r.t. x_t (what DPS needs)."""
    save_tiny(tmp_path)
    prior = DDPMPrior(str(tmp_path), precision="amp_bf16")
    assert prior.unet.dtype == torch.float32
    seen = []
    for m in prior.unet.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    eps = prior.eps(x, 500)
    (grad,) = torch.autograd.grad(eps.square().sum(), x)
    assert eps.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    eps32 = DDPMPrior(str(tmp_path)).eps(x, 500)
    assert not torch.equal(eps, eps32) and (eps - eps32).abs().max() < 0.1 * eps32.abs().max()


@pytest.mark.parametrize("solver_name", ["red_diff", "dps"])
def test_solver_configs_compose_with_ddpm_schedule(tmp_path, solver_name: str) -> None:
    """solver=red_diff|dps selects noise_schedule=ddpm by itself; a command-line choice still wins."""
    save_tiny(tmp_path)
    cfg = compose_config([f"solver={solver_name}", "prior=tiny_ddpm", f"prior.path={tmp_path}"])
    assert cfg.noise_schedule._target_ == "g2d2.noise.ddpm.DDPMTimesteps"
    cfg = compose_config([f"solver={solver_name}", "noise_schedule.spacing=leading", "solver.num_steps=3"])
    solver = instantiate(cfg.solver, noise_schedule=instantiate(cfg.noise_schedule))
    assert solver.noise_schedule.spacing == "leading" and solver.num_steps == 3
    prior_cfg = compose_config(["prior=tiny_ddpm", f"prior.path={tmp_path}"]).prior
    prior = instantiate(prior_cfg, device="cpu", precision="fp32")
    assert isinstance(prior, DDPMPrior) and prior.image_size == 16


@pytest.mark.parametrize("name", ["ddpm_celebahq", "adm_ffhq", "adm_imagenet"])
def test_real_prior_configs_fail_clearly_without_weights(name: str, monkeypatch) -> None:
    monkeypatch.delenv("G2D2_ADM_FFHQ", raising=False)
    monkeypatch.delenv("G2D2_ADM_IMAGENET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config([f"prior={name}"])
    with pytest.raises(Exception) as err:
        instantiate(cfg.prior, device="cpu", precision="fp32")
    text = str(err.value) + str(err.value.__cause__ or "")
    assert "prior.path" in text or "google/ddpm-celebahq-256" in text


def test_wrong_prior_or_schedule_kind_is_refused() -> None:
    class NotADDPMGrid:
        kind = "discrete"

    with pytest.raises(TypeError, match="noise_schedule=ddpm"):
        REDDiff(noise_schedule=NotADDPMGrid())
    with pytest.raises(TypeError, match="pixel-space prior"):
        DPS(num_steps=2).solve(torch.nn.Linear(1, 1), Identity16(), torch.zeros(1, 3, 16, 16), torch.Generator())


@pytest.mark.skipif(not (EMBEDDED_DIR / "tiny_ddpm").is_dir(), reason="embedded tiny_ddpm not trained yet")
def test_embedded_tiny_ddpm_loads() -> None:
    prior = DDPMPrior("embedded:tiny_ddpm")
    assert prior.num_train_timesteps > 0 and prior.image_size > 0
    x = torch.zeros(1, 3, prior.image_size, prior.image_size)
    assert torch.isfinite(prior.eps(x, prior.num_train_timesteps - 1)).all()
    sched = json.loads((EMBEDDED_DIR / "tiny_ddpm" / "scheduler" / "scheduler_config.json").read_text())
    assert math.isclose(prior.alphas_cumprod[0].item(), 1 - sched.get("beta_start", 1e-4), rel_tol=1e-9)


def test_gradient_checkpointing_recomputes_the_unet_with_the_same_gradient(tmp_path) -> None:
    save_tiny(tmp_path, out_channels=6, variance_type="learned_range")
    x0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grads, calls = [], []
    for flag in (False, True):
        prior = DDPMPrior(str(tmp_path), gradient_checkpointing=flag)
        count = [0]
        prior.unet.down_blocks[1].resnets[0].register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        x = x0.clone().requires_grad_(True)
        eps, log_var = prior.predict(x, 500)
        (eps.square().sum() + log_var.sum()).backward()
        grads.append(x.grad)
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointed: the resnet runs again during the backward pass
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    # DPS differentiates with torch.autograd.grad: the same samples with and without checkpointing
    y = x0.clamp(-1, 1)
    samples = [
        DPS(num_steps=3).solve(DDPMPrior(str(tmp_path), gradient_checkpointing=flag), Identity16(), y,
                               generator=torch.Generator().manual_seed(0))
        for flag in (False, True)
    ]
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver_name", ["red_diff", "dps"])
def test_pixel_solver_selects_the_tiny_ddpm_unless_a_prior_is_chosen(solver_name: str) -> None:
    # `-m solver=g2d2,dps` sweeps without a prior mismatch: each solver brings its default prior
    choice = lambda overrides: compose_config(overrides, return_hydra_config=True).hydra.runtime.choices.prior  # noqa: E731
    assert choice([f"solver={solver_name}"]) == "tiny_ddpm"
    assert choice([f"solver={solver_name}", "prior=adm_ffhq"]) == "adm_ffhq"
    assert choice([f"+method={solver_name}_ffhq"]) == "adm_ffhq"
    assert choice(["solver=g2d2"]) == "tiny_vq"


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_large_log", "learned"])
def test_unsupported_scheduler_variance_type_is_refused(tmp_path, variance_type: str) -> None:
    # fixed_large (beta_t) would otherwise be sampled with the fixed-small variance beta_tilde_t, silently
    save_tiny(tmp_path, out_channels=6 if variance_type == "learned" else 3, variance_type=variance_type)
    with pytest.raises(CheckpointError, match=rf"variance_type '{variance_type}'.*fixed_small.*learned_range"):
        DDPMPrior(str(tmp_path))


def test_fixed_small_log_variance_type_loads_as_fixed_small(tmp_path) -> None:
    save_tiny(tmp_path, variance_type="fixed_small_log")
    prior = DDPMPrior(str(tmp_path))
    assert not prior.learned_variance and prior.predict(torch.zeros(1, 3, 16, 16), 5)[1] is None


@pytest.mark.parametrize("steps,bound", [(10, 4e-4), (25, 1.5e-4), (100, 3e-5)])
def test_respaced_log_variance_error_from_float32_log_var(steps: int, bound: float) -> None:
    """The prior's log_var is float32 (from float32 tables, as DDPMPrior computes it); recovering the
    fraction from it costs at most ~3e-4 in log_var at 10 steps (measured 3.0e-4, 9.8e-5, 1.7e-5)."""
    ab = torch.cumprod(1 - linear_betas(), 0)
    full = ddpm_chain(ab)
    ts = DDPMTimesteps().timesteps(1000, steps).flip(0)
    chain = ddpm_chain(ab, ts)
    log_beta, log_beta_tilde = full.betas.log().float(), full.posterior_log_variance_clipped.float()
    frac = torch.linspace(0, 1, 101, dtype=torch.float32)
    worst = 0.0
    for i in range(1, steps):
        t = int(ts[i])
        log_var = frac * log_beta[t] + (1 - frac) * log_beta_tilde[t]  # float32, as the prior's output
        new = respaced_log_variance(log_var, t, full, chain, i)
        exact = frac.double() * chain.betas[i].log() + (1 - frac.double()) * chain.posterior_log_variance_clipped[i]
        assert new.dtype == torch.float32
        worst = max(worst, (new.double() - exact).abs().max().item())
    assert worst < bound


def spacing_and_grid(overrides: list[str]) -> tuple[str, list[int]]:
    """(noise_schedule.spacing, timesteps of the instantiated solver) of a composed config."""
    cfg = compose_config(overrides)
    solver = instantiate(cfg.solver, noise_schedule=instantiate(cfg.noise_schedule))
    return cfg.noise_schedule.spacing, solver.noise_schedule.timesteps(1000, solver.num_steps).tolist()


def test_red_diff_visits_the_leading_grid_and_dps_the_linspace_grid() -> None:
    """RED-Diff's public code visits range(0, T, T // N) ("leading"); DPS respaces with linspace.
    At N = 100 (the tiny preset) they differ: 990, 980, ..., 0 vs 999, 989, ..., 0."""
    leading, linspace = list(range(990, -1, -10)), DDPMTimesteps("linspace").timesteps(1000, 100).tolist()
    assert linspace[:3] == [999, 989, 979] and linspace[-1] == 0
    # the tiny prior's budget is 100 steps; the real-prior methods at 100 steps on the command line
    for overrides in (["solver=red_diff"], ["+method=red_diff_tiny"], ["solver=red_diff", "prior=adm_ffhq",
                      "solver.num_steps=100"], ["+experiment=table_red_diff", "method=red_diff_imagenet",
                                                "task=sr4", "solver.num_steps=100"]):
        assert spacing_and_grid(overrides) == ("leading", leading), overrides
    for overrides in (["solver=dps"], ["+method=dps_tiny"], ["+experiment=table_red_diff", "method=dps_imagenet",
                                                             "task=sr4", "solver.num_steps=100"]):
        assert spacing_and_grid(overrides) == ("linspace", linspace), overrides
    # a command-line spacing still wins, and RED-Diff built in Python defaults to the same grid
    assert spacing_and_grid(["solver=red_diff", "noise_schedule.spacing=linspace"]) == ("linspace", linspace)
    assert REDDiff(num_steps=100).noise_schedule.timesteps(1000, 100).tolist() == leading
    assert DPS(num_steps=100).noise_schedule.timesteps(1000, 100).tolist() == linspace


@pytest.mark.parametrize("num_steps,visited", [(300, 334), (7, 8), (3, 4), (1000, 1000), (500, 500), (1, 1)])
def test_leading_grid_is_the_public_range_even_when_it_has_more_than_n_steps(num_steps: int, visited: int) -> None:
    """NVlabs RED-diff's get_timesteps: range(0, T, T // N), which has more than N entries when T // N
    does not divide T."""
    grid = DDPMTimesteps("leading").timesteps(1000, num_steps).tolist()
    assert grid == list(reversed(range(0, 1000, 1000 // num_steps)))
    assert len(grid) == visited


def test_red_diff_methods_use_the_public_learning_rate() -> None:
    """lr 0.1 (NVlabs RED-diff _configs/algo/reddiff.yaml) for every RED-Diff method, the solver built in
    Python, and the tiny table's method."""
    assert REDDiff().lr == 0.1
    for overrides in (["solver=red_diff"], ["+method=red_diff_tiny"], ["+method=red_diff_ffhq"],
                      ["+method=red_diff_imagenet"], ["+experiment=table_red_diff", "task=gauss_deblur"],
                      ["+experiment=table_dps_ffhq", "method=red_diff_ffhq", "task=inpaint_box"]):
        assert compose_config(overrides).solver.lr == 0.1, overrides


#: DPS scale per task: the public FFHQ configs, and on ImageNet the deblurs times the paper's ratios
DPS_FFHQ_SCALES = {"sr4": 0.3, "inpaint_box": 0.5, "gauss_deblur": 0.3, "motion_deblur": 0.3}
DPS_IMAGENET_SCALES = {**DPS_FFHQ_SCALES, "gauss_deblur": 0.3 * 0.4, "motion_deblur": 0.3 * 0.6}


@pytest.mark.parametrize(
    "experiment,method,expected",
    [("table_dps_ffhq", "dps_ffhq", DPS_FFHQ_SCALES), ("table_dps_imagenet", "dps_imagenet", DPS_IMAGENET_SCALES),
     ("table_red_diff", "dps_imagenet", DPS_IMAGENET_SCALES)],
)
def test_dps_step_size_per_prior_and_task(experiment: str, method: str, expected: dict[str, float]) -> None:
    for task, scale in expected.items():
        cfg = compose_config([f"+experiment={experiment}", f"method={method}", f"task={task}"])
        solver = instantiate(cfg.solver, noise_schedule=instantiate(cfg.noise_schedule))
        assert solver.scale == pytest.approx(scale, abs=1e-12), (experiment, method, task)
    # a command-line value still wins over the ImageNet ratio
    cfg = compose_config([f"+experiment={experiment}", f"method={method}", "task=gauss_deblur", "solver.scale=0.7"])
    assert cfg.solver.scale == 0.7
    # the tiny prior's CPU budget is unaffected
    assert compose_config(["+method=dps_tiny", "task=gauss_deblur"]).solver.scale == 10.0
