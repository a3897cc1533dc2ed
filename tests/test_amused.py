"""AmusedPrior on a tiny random aMUSEd (VQModel + UVit2DModel + AmusedScheduler + CLIP text tower with
projection) saved with save_pretrained in the hub layout (no download): loading, p(z0 | z_t) against
AmusedPipeline's own U-ViT calls, the masking schedule against AmusedScheduler's, relaxed / hard decode,
encode, guidance and per-image prompts, clear errors, and G2D2 on every task."""

from __future__ import annotations

import inspect
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, compose_config
from hydra.utils import instantiate
from vq_toys import TEXT_DIM, TEXT_LEN, _toy_tokenizer

from g2d2.noise import MarkovPosterior, StarShaped
from g2d2.noise.mask_schedule import absorbing_schedules, amused_mask_ratios
from g2d2.noise.vq_schedule import log_kernel
from g2d2.priors.amused import AmusedPrior
from g2d2.priors.checkpoints import CheckpointError
from g2d2.solvers.g2d2 import G2D2

#: tiny shapes: 12 codes, vocab 16 (mask token 15, not 12: the id translation is exercised), 8 x 8 tokens, 32 px
CODES, VOCAB, SIDE, PX, PROJ = 12, 16, 8, 32, 16
PROMPT = "a photo of a cat"
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_amused(root: Path, downsample: bool = False, schedule: str = "cosine", seed: int = 0) -> Path:
    """Save a random aMUSEd-shaped model in the amused/amused-256 layout under `root`.

    downsample=True: the amused-512 U-ViT variant (down/upsampling around the transformer layers)."""
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vq = VQModel(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=8, num_vq_embeddings=CODES, norm_num_groups=8,
        layers_per_block=1, sample_size=PX, mid_block_add_attention=False, lookup_from_codebook=True,
        force_upcast=True,
    )
    with torch.no_grad():  # spread the codebook so that codes decode to distinct images
        vq.quantize.embedding.weight.normal_()
    vq.save_pretrained(root / "vqvae")
    UVit2DModel(
        hidden_size=16, cond_embed_dim=PROJ, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
        encoder_hidden_size=TEXT_DIM, vocab_size=VOCAB, codebook_size=CODES, in_channels=16, block_out_channels=16,
        num_res_blocks=1, downsample=downsample, upsample=downsample, block_num_heads=2, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, sample_size=SIDE,
    ).save_pretrained(root / "transformer")
    AmusedScheduler(mask_token_id=VOCAB - 1, masking_schedule=schedule).save_pretrained(root / "scheduler")
    _toy_tokenizer(root / "tokenizer")
    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=64, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TEXT_LEN, projection_dim=PROJ, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("amused")
    return {
        "256": make_tiny_amused(root / "a256"),
        "512": make_tiny_amused(root / "a512", downsample=True),
        "linear": make_tiny_amused(root / "linear", schedule="linear"),
    }


@pytest.fixture(scope="module")
def guided(tiny_dirs):
    return AmusedPrior(str(tiny_dirs["512"]), prompt=PROMPT, guidance_scale=3.0, num_timesteps=12)


def _random_tokens(seed: int, batch: int = 2, masked: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CODES, (batch, SIDE * SIDE), generator=g)
    return torch.where(torch.rand(tokens.shape, generator=g) < masked, CODES, tokens)


# ---------------------------------------------------------------------------------------------- loading


def test_loads_the_hub_layout(guided):
    assert (guided.num_codes, guided.mask_id, guided.mask_token_id) == (CODES, CODES, VOCAB - 1)
    assert (guided.token_shape, guided.num_tokens, guided.image_size, guided.num_timesteps) == ((8, 8), 64, PX, 12)
    assert guided.codebook.shape == (CODES, 8) and guided.codebook.dtype == torch.float32
    assert not any(p.requires_grad for p in guided.parameters())
    assert guided._text == {}  # the fixed prompt is encoded once and the text tower freed
    torch.testing.assert_close(guided.micro_conds, torch.tensor([[PX, PX, 0, 0, 6.0]]))


def test_prior_yamls_are_constructor_arguments_and_real_shapes():
    params = set(inspect.signature(AmusedPrior).parameters) - {"device", "precision", "gradient_checkpointing"}
    for name in ("amused_256", "amused_512"):
        cfg = yaml.safe_load((CONF / "prior" / f"{name}.yaml").read_text())
        assert cfg.pop("_target_") == "g2d2.priors.amused.AmusedPrior" and set(cfg) == params, name
        assert cfg["path"] == f"amused/{name.replace('_', '-')}" and not cfg["allow_download"]


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("schedule, steps, n", [("cosine", 12, 64), ("cosine", 7, 256), ("linear", 12, 1024)])
def test_masking_schedule_matches_amused_scheduler_step(schedule, steps, n):
    """floor(N gamma_bar_{t-1}) = the number of tokens AmusedScheduler.step leaves masked after timestep t
    (within its clamps [1, N-1] from an all-masked input); the last step reveals everything."""
    from diffusers import AmusedScheduler

    scheduler = AmusedScheduler(mask_token_id=CODES, masking_schedule=schedule)
    scheduler.set_timesteps(steps)
    gamma = amused_mask_ratios(steps, schedule)
    prior = type("P", (), {"num_tokens": n, "log_cumprod_ct": absorbing_schedules(gamma)["log_cumprod_ct"]})()
    process = StarShaped()
    assert gamma[steps - 1] == 1.0 and process.num_masked(prior, steps - 1) == n  # z_{T-1}: all masked
    for t in scheduler.timesteps.tolist():
        sample = torch.full((1, n), CODES)
        out = scheduler.step(torch.randn(1, n, CODES), t, sample, generator=torch.Generator().manual_seed(t))
        left = int((out.prev_sample == CODES).sum())
        expected = 0 if t == 0 else min(max(process.num_masked(prior, t - 1), 1), n - 1)
        assert left == expected, (t, left, expected)
    # the ratio itself: m((T-1-t)/T)
    ratio = (steps - 1 - torch.arange(steps, dtype=torch.float64)) / steps
    m = torch.cos(ratio * math.pi / 2) if schedule == "cosine" else 1 - ratio
    torch.testing.assert_close(gamma, m, rtol=0, atol=1e-6)


def test_absorbing_schedules_are_mask_only_kernels(tiny_dirs):
    """alpha_bar = 1 - gamma_bar, no uniform part, and every kernel q(z_t | z_s) keeps or masks: a + c = 1."""
    prior = AmusedPrior(str(tiny_dirs["linear"]), num_timesteps=10)
    assert prior.masking_schedule == "linear"
    gamma = prior.log_cumprod_ct.exp()
    torch.testing.assert_close(gamma, (torch.arange(10, dtype=torch.float64) + 1) / 10)
    torch.testing.assert_close(prior.log_cumprod_at.exp(), 1 - gamma)
    assert torch.isneginf(prior.log_cumprod_bt).all() and torch.isneginf(prior.log_bt).all()
    for s, t in [(-1, 0), (-1, 9), (2, 5), (8, 9)]:
        a, b, c = (math.exp(v) for v in log_kernel(prior, s, t))
        assert b < 1e-15 and a + c == pytest.approx(1.0, abs=1e-12)
        assert c == pytest.approx(1 - (1 - gamma[t].item()) / (1 - (gamma[s].item() if s >= 0 else 0.0)))


# ---------------------------------------------------------------------------------------------- p(z0 | z_t)


def test_log_p_x0_is_what_amused_pipeline_feeds_its_scheduler(tiny_dirs, guided):
    """AmusedPipeline (same components, prompt, guidance 3) run for 3 steps: at every step the guided logits it
    gives AmusedScheduler.step, log-softmaxed, equal log_p_x0 of the same tokens at the masked positions."""
    from diffusers import AmusedPipeline, AmusedScheduler
    from transformers import CLIPTokenizer

    root = tiny_dirs["512"]
    pipe = AmusedPipeline(
        vqvae=guided.vqvae, tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
        text_encoder=_text_encoder(root), transformer=guided.transformer,
        scheduler=AmusedScheduler.from_pretrained(str(root / "scheduler")),
    )
    calls = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda model_output, timestep, sample, **kw: (
        calls.append((model_output.clone(), sample.clone())) or step(model_output, timestep, sample, **kw)
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
         output_type="latent")
    assert len(calls) == 3
    for model_output, sample in calls:
        tokens = sample.flatten(1)  # (1, N) with aMUSEd's mask id
        ours_in = torch.where(tokens == VOCAB - 1, CODES, tokens)
        ours = guided.log_p_x0(ours_in, 0)
        ref = torch.log_softmax(model_output.float().flatten(2), dim=1).clamp(min=-70)
        masked = (ours_in == CODES).unsqueeze(1).expand_as(ours)
        assert masked.any()
        torch.testing.assert_close(ours[masked], ref[masked], rtol=0, atol=1e-5)
        # unmasked tokens: kept with probability 1
        kept = ~masked[:, 0]
        assert torch.equal(ours.argmax(1)[kept], ours_in[kept]) and (ours.exp().sum(1) - 1).abs().max() < 1e-5


def _text_encoder(root: Path):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection.from_pretrained(str(root / "text_encoder")).eval()


def test_guidance_prompts_and_time_independence(tiny_dirs, guided):
    """l = l_u + s (l_c - l_u) with the empty prompt as l_u; guidance 1 is the single conditional pass; no prompt
    is the empty prompt; t does not matter (the U-ViT has no timestep input)."""
    root = str(tiny_dirs["512"])
    tokens = _random_tokens(1)
    plain = AmusedPrior(root, prompt=PROMPT, num_timesteps=12)
    empty = AmusedPrior(root, num_timesteps=12)
    masked = (tokens == CODES).unsqueeze(1).expand(-1, CODES, -1)
    l_c, l_u = plain.log_p_x0(tokens, 3), empty.log_p_x0(tokens, 3)
    expected = torch.log_softmax(l_u + 3.0 * (l_c - l_u), dim=1).clamp(min=-70)  # log-softmax is shift-invariant
    torch.testing.assert_close(guided.log_p_x0(tokens, 3)[masked], expected[masked], rtol=0, atol=1e-4)
    assert (l_c - l_u)[masked].abs().max() > 1e-3  # the prompt changes the prediction
    torch.testing.assert_close(guided.log_p_x0(tokens, 0), guided.log_p_x0(tokens, 11), rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a prompt"):
        AmusedPrior(root, guidance_scale=2.0)


def test_per_image_prompts_match_fixed_prompt_priors(tiny_dirs):
    root = str(tiny_dirs["256"])
    prior = AmusedPrior(root, prompt_from_data=True, guidance_scale=2.0)
    tokens = _random_tokens(2)
    with pytest.raises(RuntimeError, match="set_prompts"):
        prior.log_p_x0(tokens, 5)
    prompts = ["a red square", "a blue circle"]
    prior.set_prompts(prompts)
    out = prior.log_p_x0(tokens, 5)
    for row, text in enumerate(prompts):
        fixed = AmusedPrior(root, prompt=text, guidance_scale=2.0)
        torch.testing.assert_close(out[row : row + 1], fixed.log_p_x0(tokens[row : row + 1], 5), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        prior.set_prompts(prompts + ["x"])
        prior.log_p_x0(tokens, 5)
    with pytest.raises(ValueError, match="exclude each other"):
        AmusedPrior(root, prompt="x", prompt_from_data=True)


# ---------------------------------------------------------------------------------------------- decode / encode


def test_decode_is_vqmodel_decode_of_the_codes_on_the_minus_one_one_scale(guided):
    """decode(one_hot(z)) = 2 VQModel.decode(z, force_not_quantize=True, shape) - 1 (AmusedPipeline's decode,
    [0, 1] -> [-1, 1]) = decode_tokens(z) before clamping; gradients reach the probabilities."""
    z = torch.randint(0, CODES, (2, 64), generator=torch.Generator().manual_seed(1))
    onehot = torch.nn.functional.one_hot(z, CODES).permute(0, 2, 1).float().requires_grad_(True)
    relaxed = guided.decode(onehot)
    vq = guided.vqvae
    ref = 2 * vq.decode(z.reshape(2, SIDE, SIDE), force_not_quantize=True, shape=(2, SIDE, SIDE, 8)).sample - 1
    assert relaxed.shape == (2, 3, PX, PX) and relaxed.dtype == torch.float32
    torch.testing.assert_close(relaxed, ref, rtol=0, atol=3e-5)  # the 2x of [0, 1] -> [-1, 1] doubles rounding
    torch.testing.assert_close(guided.decode_tokens(z), ref.clamp(-1, 1), rtol=0, atol=3e-5)
    relaxed.square().sum().backward()
    assert torch.isfinite(onehot.grad).all() and onehot.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="code ids"):
        guided.decode_tokens(torch.full((1, 64), CODES))


def test_encode_matches_the_amused_img2img_quantizer(guided):
    """encode(x) = the VQ quantizer's ids of (x + 1) / 2, as AmusedImg2ImgPipeline encodes a [0, 1] image."""
    x = torch.rand(2, 3, PX, PX, generator=torch.Generator().manual_seed(2)) * 2 - 1
    vq = guided.vqvae
    ref = vq.quantize(vq.encode((x + 1) / 2).latents)[2][2].reshape(2, 64)
    assert torch.equal(guided.encode(x), ref)


def test_half_precision_keeps_the_force_upcast_decoder_in_float32(tiny_dirs):
    prior = AmusedPrior(str(tiny_dirs["256"]), prompt=PROMPT, guidance_scale=2.0, precision="bf16")
    assert prior.transformer.dtype == torch.bfloat16 and prior.vqvae.dtype == torch.float32
    out = prior.log_p_x0(_random_tokens(3), 4)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert prior.decode(torch.softmax(torch.randn(1, CODES, 64), 1)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("missing", ["vqvae", "transformer", "scheduler", "text_encoder", "tokenizer"])
def test_missing_component_is_a_clear_error(tiny_dirs, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["256"], broken)
    shutil.rmtree(broken / missing)
    with pytest.raises(CheckpointError, match=f"has no '{missing}/' folder.*amused/amused-256"):
        AmusedPrior(str(broken))


def test_inconsistent_sizes_and_bad_arguments(tiny_dirs, tmp_path):
    from diffusers import AmusedScheduler

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["256"], broken)
    AmusedScheduler(mask_token_id=VOCAB).save_pretrained(broken / "scheduler")  # outside the U-ViT's vocabulary
    with pytest.raises(CheckpointError, match="mask_token_id=16"):
        AmusedPrior(str(broken))
    with pytest.raises(CheckpointError, match="does not exist"):
        AmusedPrior(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="num_timesteps"):
        AmusedPrior(str(tiny_dirs["256"]), num_timesteps=0)
    with pytest.raises(ValueError, match="precision"):
        AmusedPrior(str(tiny_dirs["256"]), precision="fp64")


# ---------------------------------------------------------------------------------------------- G2D2 on it


@pytest.fixture(scope="module")
def plain(tiny_dirs):
    return AmusedPrior(str(tiny_dirs["256"]), prompt=PROMPT, num_timesteps=20)


@pytest.mark.parametrize("task", TASKS)
def test_g2d2_runs_every_task(plain, task):
    """The unchanged G2D2 solver with the star-shaped process on every conf/task at 32 px: finite images of the
    prior's shape in [-1, 1], the hard decode of code tokens."""
    cfg = compose_config([f"task={task}", f"data.image_size={PX}"])
    gen = torch.Generator().manual_seed(0)
    operator = instantiate(cfg.task.operator, generator=gen)
    x = plain.decode_tokens(torch.randint(0, CODES, (1, 64), generator=gen))
    y = operator.measure(x, cfg.task.sigma, gen)
    out = G2D2(StarShaped(), num_steps=3, inner_iters=2).solve(plain, operator, y, torch.Generator().manual_seed(1))
    assert out.shape == (1, 3, PX, PX) and torch.isfinite(out).all() and out.abs().max() <= 1.0


@pytest.mark.parametrize("process", [StarShaped, MarkovPosterior])
def test_g2d2_fits_the_measurement_better_than_prior_samples(plain, process):
    """SR x4 of a decoded random token map: G2D2's reconstructions fit y better than the same chain without the
    data term (inner_iters=0: tokens drawn from the random prior alone), with either noise process (the masking
    schedule drives both). Measured here: residual 1.85-2.06 against 2.98-3.26 (noise floor 0.69)."""
    from g2d2.operators.resize import SuperResolution

    gen = torch.Generator().manual_seed(3)
    op = SuperResolution(image_size=PX, factor=4)
    x = plain.decode_tokens(torch.randint(0, CODES, (2, 64), generator=gen))
    y = op.measure(x, 0.05, gen)
    x_hat = G2D2(process(), num_steps=12, inner_iters=20).solve(plain, op, y, torch.Generator().manual_seed(4))
    prior_only = G2D2(process(), num_steps=12, inner_iters=0).solve(plain, op, y, torch.Generator().manual_seed(4))
    fit = (op.forward(x_hat) - y).flatten(1).norm(dim=1)
    blind = (op.forward(prior_only) - y).flatten(1).norm(dim=1)
    assert (fit < 0.8 * blind).all(), (fit, blind)


# ---------------------------------------------------------------------------------------------- benchmark rows


@pytest.mark.parametrize("name", ["amused_256", "amused_512"])
def test_benchmark_rows_load_the_random_amused_shapes_as_run_py_would(name, tmp_path):
    """The benchmark's aMUSEd row (tiny scale): its overrides compose the G2D2 aMUSEd method on `name` with the
    random checkpoint's path, and the runner's build_prior loads that checkpoint with the shapes written."""
    from g2d2.bench import cli, models, rows
    from g2d2.experiment.runner import build_prior

    info = models.write_amused(tmp_path / name, name, "tiny", torch.device("cpu"), torch.float32)
    args = cli.parse_args(["--scale", "tiny", "--device", "cpu", "--solvers", "g2d2"])
    assert name in args.discrete_priors
    overrides = rows.row_overrides(rows.METHODS["g2d2", name], tmp_path / name, info["image_size"], "fp32", False,
                                   args, True, rows.PRIOR_OVERRIDES.get(name, ()))
    cfg = rows.compose_run_config(overrides)
    assert cfg.prior._target_ == "g2d2.priors.amused.AmusedPrior" and cfg.noise_schedule._target_.endswith("StarShaped")
    assert cfg.prior.path == str(tmp_path / name) and cfg.prior.guidance_scale == args.guidance
    prior = build_prior(cfg, torch.device("cpu"))
    vq, uvit, _, mask_token_id = models.AMUSED_SHAPES[name]["tiny"]
    assert prior.image_size == info["image_size"] and prior.mask_token_id == mask_token_id
    assert prior.transformer.config.downsample == (name == "amused_512")
    # the full shapes: aMUSEd's published sizes
    full_vq, full_uvit, full_text, full_mask = models.AMUSED_SHAPES[name]["full"]
    assert (full_vq["num_vq_embeddings"], full_uvit["codebook_size"], full_uvit["vocab_size"], full_mask) == (
        8192, 8192, 8256, 8255)
    assert full_uvit["sample_size"] * 2 ** (len(full_vq["block_out_channels"]) - 1) == int(name.split("_")[1])
