"""Test helpers (not collected): a closed-form toy discrete prior, a toy pixel-mask operator, and a
tiny random VQ-Diffusion checkpoint written with save_pretrained (no download)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from g2d2.noise.vq_schedule import log_kernel, log_transition_to, vq_diffusion_schedules
from g2d2.operators.base import LinearOperator
from g2d2.priors.base import DiscretePrior


class FactorisedToyPrior(DiscretePrior):
    """p(z0) = prod_n pi_n(z0_n) with the VQ-Diffusion forward process: p(z0 | z_t) is exact,
    p(z0_n = k | z_t) ~ pi_n(k) q(z_t,n | z0_n = k). Decoder: token n -> pixel n of colour C[k]
    (linear in the probabilities), image side = token grid side.
    """

    def __init__(self, log_pi: torch.Tensor, colours: torch.Tensor, side: int, num_timesteps: int = 10) -> None:
        super().__init__()
        self.num_codes, n = log_pi.shape
        assert n == side * side and colours.shape == (self.num_codes, 3)
        self.token_shape, self.image_size, self.num_timesteps = (side, side), side, num_timesteps
        for name, value in vq_diffusion_schedules(num_timesteps, self.num_codes).items():
            setattr(self, name, value)
        self.register_buffer("log_pi", torch.log_softmax(log_pi.double(), 0).float())
        self.register_buffer("colours", colours.float())

    @torch.no_grad()
    def log_p_x0(self, tokens_t: torch.Tensor, t: int) -> torch.Tensor:
        lq = log_transition_to(tokens_t, self.num_codes, log_kernel(self, -1, t))  # (B, K, N)
        return torch.log_softmax(self.log_pi + lq, dim=1).clamp(min=-70.0)

    def decode(self, probs: torch.Tensor) -> torch.Tensor:
        b = probs.shape[0]
        return torch.einsum("bkn,kc->bcn", probs, self.colours.to(probs.dtype)).reshape(b, 3, *self.token_shape)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.colours[tokens].permute(0, 2, 1).reshape(tokens.shape[0], 3, *self.token_shape).clamp(-1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pix = x.flatten(2).transpose(1, 2)  # (B, N, 3)
        return torch.cdist(pix, self.colours.expand(x.shape[0], -1, -1)).argmin(-1)

    def enumerate_posterior(self, y: torch.Tensor, operator: LinearOperator, sigma: float):
        """All K^N configurations z0 (tuples) and their exact posterior p(z0 | y) under y = A D(z0) + sigma n."""
        configs = list(itertools.product(range(self.num_codes), repeat=self.num_tokens))
        z = torch.tensor(configs)
        log_prior = self.log_pi.double().T[torch.arange(self.num_tokens), z].sum(1)  # (M,)
        resid = (y.double() - operator.forward(self.decode_tokens(z).double())).flatten(1)
        log_post = log_prior - (resid**2).sum(1) / (2 * sigma**2)
        return configs, torch.softmax(log_post, 0), torch.softmax(log_prior, 0)


class PixelMask(LinearOperator):
    """A x = x on the kept pixels (the same mask on all channels), 0 elsewhere."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__(keep.shape[-1], 3)
        self.keep = keep.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.to(x.dtype)

    adjoint = forward
    pinv = forward


def frequencies(tokens: torch.Tensor, configs: list[tuple[int, ...]]) -> torch.Tensor:
    """Empirical frequency of each configuration among the rows of tokens (B, N)."""
    index = {c: i for i, c in enumerate(configs)}
    counts = torch.zeros(len(configs), dtype=torch.float64)
    for row in tokens.tolist():
        counts[index[tuple(row)]] += 1
    return counts / counts.sum()


# ----------------------------------------------------------------- tiny random VQ-Diffusion
TINY_CODES, TINY_T, TEXT_DIM, TEXT_LEN = 12, 10, 32, 16


def _toy_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz-.":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = ["#version: 0.2", "p h", "ph o", "pho t", "phot o</w>", "o f</w>"]
    for piece in ("ph", "pho", "phot", "photo</w>", "of</w>"):
        vocab[piece] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)  # vocab.json + merges.txt, as in the ITHQ tokenizer/
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=TEXT_LEN)
    tok.save_pretrained(str(folder))


def make_tiny_vq_diffusion(root: Path, text: bool = True, learned_null: bool = True, seed: int = 0) -> Path:
    """Save a random VQ-Diffusion (16 px images, 8x8 tokens, 12 codes, T = 10) in the ITHQ layout.

    text=False writes the unconditional layout (vqvae/, transformer/, scheduler/ only).
    """
    from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    vq = VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=TINY_CODES,
        vq_embed_dim=8, sample_size=16,
    )
    with torch.no_grad():  # spread the codebook so that codes decode to distinct images
        vq.quantize.embedding.weight.normal_()
    vq.save_pretrained(root / "vqvae")
    Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8,
        num_vector_embeds=TINY_CODES + 1, norm_type="ada_norm", num_embeds_ada_norm=TINY_T,
        cross_attention_dim=TEXT_DIM if text else None, activation_fn="geglu-approximate", attention_bias=True,
    ).save_pretrained(root / "transformer")
    VQDiffusionScheduler(num_vec_classes=TINY_CODES + 1, num_train_timesteps=TINY_T).save_pretrained(root / "scheduler")
    if text:
        from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
            LearnedClassifierFreeSamplingEmbeddings,
        )
        from transformers import CLIPTextConfig, CLIPTextModel

        _toy_tokenizer(root / "tokenizer")
        CLIPTextModel(CLIPTextConfig(
            vocab_size=64, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=TEXT_LEN, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )).save_pretrained(root / "text_encoder")
        if learned_null:
            emb = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=TEXT_DIM, length=TEXT_LEN)
            with torch.no_grad():
                emb.embeddings.normal_()
            emb.save_pretrained(root / "learned_classifier_free_sampling_embeddings")
    return root


def dense_kernel(num_codes: int, log_abc: tuple[float, float, float]) -> torch.Tensor:
    """(K+1, K+1) float64 transition matrix M[j, i] = q(z_t = i | z_s = j) of the kernel (a, b, c)."""
    a, b, c = (math.exp(v) for v in log_abc)
    m = torch.full((num_codes + 1, num_codes + 1), b, dtype=torch.float64)
    m[:, num_codes] = c
    m[torch.arange(num_codes), torch.arange(num_codes)] = a + b
    m[num_codes] = 0.0
    m[num_codes, num_codes] = 1.0
    return m
