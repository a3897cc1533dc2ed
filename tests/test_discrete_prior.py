"""VQDiffusionPrior on tiny random VQ-Diffusion checkpoints saved with save_pretrained in the ITHQ
layout (no download): loading, guidance, relaxed/hard decode, encode, gradients, clear errors."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import VQDiffusionScheduler
from vq_toys import TINY_CODES, TINY_T, make_tiny_vq_diffusion

from g2d2.priors.checkpoints import CheckpointError
from g2d2.priors.discrete import VQDiffusionPrior

CONF = Path(__file__).resolve().parent.parent / "conf"
PROMPT = "a photo of a cat"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqd")
    return {
        "text": make_tiny_vq_diffusion(root / "text"),
        "text_no_null": make_tiny_vq_diffusion(root / "text_no_null", learned_null=False),
        "uncond": make_tiny_vq_diffusion(root / "uncond", text=False),
    }


@pytest.fixture(scope="module")
def guided(tiny_dirs):
    return VQDiffusionPrior(str(tiny_dirs["text"]), prompt=PROMPT, guidance_scale=3.0)


def test_loads_the_ithq_layout(guided):
    assert (guided.num_codes, guided.mask_id, guided.token_shape) == (TINY_CODES, TINY_CODES, (8, 8))
    assert guided.num_tokens == 64
    assert (guided.image_size, guided.num_timesteps) == (16, TINY_T)
    assert guided.codebook.shape == (TINY_CODES, 8) and guided.codebook.dtype == torch.float32
    assert not any(p.requires_grad for p in guided.parameters())
    ref = VQDiffusionScheduler(num_vec_classes=TINY_CODES + 1, num_train_timesteps=TINY_T)
    for name in ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct", "log_at", "log_bt", "log_ct"):
        value = getattr(guided, name)
        assert value.dtype == torch.float64 and value.shape == (TINY_T,)
        torch.testing.assert_close(value.float(), getattr(ref, name)[:TINY_T], rtol=0, atol=1e-5)


def _transformer(prior, tokens, text, t):
    return prior.transformer(tokens, encoder_hidden_states=text, timestep=torch.tensor(t)).sample.double()


def test_log_p_x0_guidance_in_log_space(guided, tiny_dirs):
    """l = l_u + s (l_c - l_u), renormalised; unconditional input = the learned null embedding."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY_CODES + 1, (2, 64), generator=g)
    out = guided.log_p_x0(tokens, 4)
    assert out.shape == (2, TINY_CODES, 64) and out.dtype == torch.float32 and out.min() >= -70.0
    torch.testing.assert_close(out.logsumexp(1), torch.zeros(2, 64), rtol=0, atol=1e-5)
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )

    null = LearnedClassifierFreeSamplingEmbeddings.from_pretrained(
        str(tiny_dirs["text"] / "learned_classifier_free_sampling_embeddings")).embeddings[None].expand(2, -1, -1)
    text = guided.cond_embedding.expand(2, -1, -1)
    l_u, l_c = _transformer(guided, tokens, null, 4), _transformer(guided, tokens, text, 4)
    expected = torch.log_softmax(l_u + 3.0 * (l_c - l_u), dim=1).clamp(min=-70).float()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_prompt_embedding_is_normalised_clip_and_empty_prompt_is_the_fallback(tiny_dirs):
    from transformers import CLIPTextModel, CLIPTokenizer

    prior = VQDiffusionPrior(str(tiny_dirs["text_no_null"]), prompt=PROMPT)
    assert prior._text == {}  # the text encoder is freed once the fixed prompt is embedded
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_dirs["text_no_null"] / "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(str(tiny_dirs["text_no_null"] / "text_encoder"))
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids)[0]
    torch.testing.assert_close(prior.uncond_embedding, hidden / hidden.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(prior.cond_embedding.norm(dim=-1), torch.ones(1, prior.cond_embedding.shape[1]))
    # guidance 1: a single conditional pass
    tokens = torch.full((1, 64), TINY_CODES)
    expected = torch.log_softmax(_transformer(prior, tokens, prior.cond_embedding, 9), 1).clamp(min=-70).float()
    torch.testing.assert_close(prior.log_p_x0(tokens, 9), expected, rtol=0, atol=1e-5)


def test_unconditional_layout(tiny_dirs):
    prior = VQDiffusionPrior(str(tiny_dirs["uncond"]))
    assert prior._text == {} and prior.cond_embedding is None and prior.uncond_embedding is None
    out = prior.log_p_x0(torch.full((3, 64), TINY_CODES), TINY_T - 1)
    assert out.shape == (3, TINY_CODES, 64) and torch.isfinite(out).all()
    with pytest.raises(CheckpointError, match="unconditional"):
        VQDiffusionPrior(str(tiny_dirs["uncond"]), prompt=PROMPT)


def test_decode_matches_vqmodel_decode_and_hard_decode(guided):
    """decode(one_hot(z)) = VQModel.decode(codebook lookup, force_not_quantize=True) (raster order)."""
    z = torch.randint(0, TINY_CODES, (2, 64), generator=torch.Generator().manual_seed(1))
    onehot = torch.nn.functional.one_hot(z, TINY_CODES).permute(0, 2, 1).float()
    relaxed = guided.decode(onehot)
    vq = guided.vqvae
    ref = vq.decode(vq.quantize.get_codebook_entry(z, (2, 8, 8, 8)), force_not_quantize=True).sample
    assert relaxed.shape == (2, 3, 16, 16) and relaxed.dtype == torch.float32
    torch.testing.assert_close(relaxed, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(guided.decode_tokens(z), ref.clamp(-1, 1), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="code ids"):
        guided.decode_tokens(torch.full((1, 64), TINY_CODES))


def test_encode_matches_the_vq_quantizer(guided):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours = guided.encode(x)
    vq = guided.vqvae
    ref = vq.quantize(vq.encode(x).latents)[2][2].reshape(2, 64)
    assert ours.shape == (2, 64) and torch.equal(ours, ref)


def test_relaxed_decode_gradient_matches_finite_differences(tiny_dirs):
    """d/d logits of <w, decode(softmax(logits))> against central differences, float64."""
    prior = VQDiffusionPrior(str(tiny_dirs["uncond"])).to(torch.float64)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, TINY_CODES, 64, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
    f = lambda lg: (w * prior.decode(torch.softmax(lg, dim=1))).sum()
    (grad,) = torch.autograd.grad(f(logits), logits)
    assert grad.abs().sum() > 0
    eps = 1e-6
    for _ in range(4):
        v = torch.randn(logits.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            numeric = (f(logits + eps * v) - f(logits - eps * v)) / (2 * eps)
        torch.testing.assert_close((grad * v).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_relaxed_decode_of_a_codes_last_layout_equals_the_codes_first_one(tiny_dirs):
    """G2D2 passes probs as a (B, N, K) tensor seen as (B, K, N): decode and its gradient are those of the same
    values stored (B, K, N)."""
    prior = VQDiffusionPrior(str(tiny_dirs["uncond"]))
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(2, TINY_CODES, 64, generator=g), 1)
    w = torch.randn(2, 3, 16, 16, generator=g)
    first = probs.clone().requires_grad_(True)
    last = probs.transpose(1, 2).contiguous().requires_grad_(True)
    assert last.transpose(1, 2).stride(1) == 1
    out_first, out_last = prior.decode(first), prior.decode(last.transpose(1, 2))
    (w * out_first).sum().backward()
    (w * out_last).sum().backward()
    torch.testing.assert_close(out_last, out_first, rtol=0, atol=1e-5)
    scale = first.grad.abs().max().item()
    torch.testing.assert_close(last.grad.transpose(1, 2), first.grad, rtol=0, atol=1e-5 * scale)


def test_the_decoder_runs_in_the_default_memory_layout(tiny_dirs):
    """Every GroupNorm of the decoder sees NCHW input, although the relaxed decode of G2D2's codes-last probs, the
    codebook lookup of decode_tokens and diffusers' attention block (a reshaped (B, HW, C) tensor) all produce
    channels-last views: on the CPU, GroupNorm's forward + backward is several times slower channels-last."""
    prior = VQDiffusionPrior(str(tiny_dirs["uncond"]))
    norms = [m for m in prior.vqvae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert prior.vqvae.decoder.mid_block.attentions[0] is not None  # the toy decoder has the attention block
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous())) for m in norms]
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(2, 64, TINY_CODES, generator=g), 2).requires_grad_(True)
    prior.decode(probs.transpose(1, 2)).sum().backward()
    prior.decode_tokens(torch.randint(0, TINY_CODES, (2, 64), generator=g))
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * len(norms) and all(seen)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_networks_keep_float32_outputs(tiny_dirs, precision):
    prior = VQDiffusionPrior(str(tiny_dirs["text"]), prompt=PROMPT, guidance_scale=2.0, precision=precision)
    assert prior.transformer.dtype == prior.vqvae.dtype != torch.float32
    out = prior.log_p_x0(torch.full((1, 64), TINY_CODES), 5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    probs = torch.softmax(torch.randn(1, TINY_CODES, 64), 1).requires_grad_()
    x = prior.decode(probs)
    x.square().sum().backward()
    assert x.dtype == torch.float32 and probs.grad is not None and torch.isfinite(probs.grad).all()


def _record_output_dtypes(module: torch.nn.Module, kind: type) -> list[torch.dtype]:
    """Forward hooks on every submodule of type `kind`: the dtypes of their outputs, in call order."""
    seen: list[torch.dtype] = []
    for m in module.modules():
        if isinstance(m, kind):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def test_mixed_precision_runs_fp32_weights_in_bf16(tiny_dirs, guided):
    """precision=amp_bf16: float32 weights, the transformer's and decoder's layers compute in bf16,
    outputs float32 and close to the fp32 prior's, gradients reach the probabilities."""
    prior = VQDiffusionPrior(str(tiny_dirs["text"]), prompt=PROMPT, guidance_scale=3.0, precision="amp_bf16")
    assert prior.transformer.dtype == prior.vqvae.dtype == torch.float32
    linear = _record_output_dtypes(prior.transformer, torch.nn.Linear)
    conv = _record_output_dtypes(prior.vqvae.decoder, torch.nn.Conv2d)
    tokens = torch.randint(0, TINY_CODES + 1, (2, 64), generator=torch.Generator().manual_seed(1))
    out, ref = prior.log_p_x0(tokens, 5), guided.log_p_x0(tokens, 5)
    assert out.dtype == torch.float32 and set(linear) == {torch.bfloat16}
    torch.testing.assert_close(out.logsumexp(1), torch.zeros(2, 64), rtol=0, atol=1e-5)
    assert not torch.equal(out, ref) and (out.exp() - ref.exp()).abs().max() < 0.05
    probs = torch.softmax(torch.randn(2, TINY_CODES, 64, generator=torch.Generator().manual_seed(2)), 1)
    probs.requires_grad_(True)
    x = prior.decode(probs)
    x.square().sum().backward()
    assert x.dtype == torch.float32 and set(conv) == {torch.bfloat16}
    assert torch.isfinite(probs.grad).all() and probs.grad.abs().sum() > 0
    with torch.no_grad():
        x32 = guided.decode(probs)
    assert (x.detach() - x32).abs().max() < 0.05 * x32.abs().max()
    # the weights never changed dtype: the autocast is scoped to the prior's network calls
    assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32


@pytest.mark.parametrize("missing", ["vqvae", "transformer", "scheduler", "text_encoder", "tokenizer"])
def test_missing_component_is_a_clear_error(tiny_dirs, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["text"], broken)
    shutil.rmtree(broken / missing)
    with pytest.raises(CheckpointError, match=f"'{missing}/'"):
        VQDiffusionPrior(str(broken), prompt=PROMPT)


def test_unloadable_component_and_bad_arguments(tiny_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["uncond"], broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="'transformer' component"):
        VQDiffusionPrior(str(broken))
    with pytest.raises(CheckpointError, match="does not exist"):
        VQDiffusionPrior(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="needs a prompt"):
        VQDiffusionPrior(str(tiny_dirs["text"]), guidance_scale=5.0)
    with pytest.raises(ValueError, match="precision"):
        VQDiffusionPrior(str(tiny_dirs["uncond"]), precision="fp64")


@pytest.mark.parametrize("name", ["vq_diffusion_ithq", "tiny_vq"])
def test_prior_yaml_keys_are_constructor_arguments(name):
    cfg = yaml.safe_load((CONF / "prior" / f"{name}.yaml").read_text())
    assert cfg.pop("_target_") == "g2d2.priors.discrete.VQDiffusionPrior"
    root_keys = {"device", "precision", "gradient_checkpointing"}  # set by the runner from the root config
    params = set(inspect.signature(VQDiffusionPrior).parameters) - root_keys
    assert set(cfg) == params


def test_gradient_checkpointing_recomputes_the_decoder_with_the_same_gradient(tiny_dirs):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, TINY_CODES, 64, generator=g)
    grads, calls = [], []
    for flag in (False, True):
        prior = VQDiffusionPrior(str(tiny_dirs["uncond"]), gradient_checkpointing=flag)
        block = prior.vqvae.decoder.up_blocks[0]
        count = [0]
        block.register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        lg = logits.clone().requires_grad_(True)
        prior.decode(torch.softmax(lg, dim=1)).square().sum().backward()
        grads.append(lg.grad)
        calls.append(count[0])
        with torch.no_grad():  # no backward, no recomputation
            prior.decode(torch.softmax(logits, dim=1))
        calls[-1] = (calls[-1], count[0] - calls[-1])
    assert calls == [(1, 1), (2, 1)]  # checkpointed: the block runs again during the backward pass
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_per_image_prompts_match_fixed_prompt_priors(tiny_dirs):
    """A prompt_from_data prior given prompts (a, b) conditions row 0 exactly as a prior built with
    prompt=a and row 1 as one with prompt=b, with guidance; each distinct prompt is encoded once."""
    root = str(tiny_dirs["text"])
    prior = VQDiffusionPrior(root, prompt_from_data=True, guidance_scale=3.0)
    tokens = torch.randint(0, TINY_CODES + 1, (2, 64), generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match="set_prompts"):
        prior.log_p_x0(tokens, 5)
    prompts = ["a red square", "a blue circle"]
    prior.set_prompts(prompts)
    out = prior.log_p_x0(tokens, 5)
    for row, text in enumerate(prompts):
        fixed = VQDiffusionPrior(root, prompt=text, guidance_scale=3.0)
        torch.testing.assert_close(out[row : row + 1], fixed.log_p_x0(tokens[row : row + 1], 5), rtol=0, atol=1e-5)
    prior.set_prompts([prompts[1], prompts[1]])
    assert set(prior._prompt_embeddings) == set(prompts)
    again = prior.log_p_x0(tokens, 5)
    torch.testing.assert_close(again[1], out[1], rtol=0, atol=1e-5)  # same prompt, same tokens
    assert (again[0] - out[0]).abs().max() > 1e-3  # row 0 now conditioned on the other prompt
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        prior.set_prompts(prompts + ["x"])
        prior.log_p_x0(tokens, 5)
    with pytest.raises(ValueError, match="non-empty prompt"):
        prior.set_prompts(["a", None])


def test_per_image_prompt_arguments_are_checked(tiny_dirs):
    with pytest.raises(ValueError, match="exclude each other"):
        VQDiffusionPrior(str(tiny_dirs["text"]), prompt="x", prompt_from_data=True)
    with pytest.raises(CheckpointError, match="prompt_from_data given but the transformer .* is unconditional"):
        VQDiffusionPrior(str(tiny_dirs["uncond"]), prompt_from_data=True)
    with pytest.raises(RuntimeError, match="prompt_from_data=true"):
        VQDiffusionPrior(str(tiny_dirs["text"]), prompt="x").set_prompts(["y"])
    VQDiffusionPrior(str(tiny_dirs["text"]), prompt_from_data=True, guidance_scale=2.0)  # guidance allowed
