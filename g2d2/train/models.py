"""Building blocks for training the tiny priors (used by scripts/train_tiny_priors.py and its tests).

- model configurations (real and `tiny` smoke-test sizes) for diffusers `VQModel`,
  `Transformer2DModel` (discrete, VQ-Diffusion) and `UNet2DModel` (DDPM);
- VQ-VAE pieces: quantised forward with token ids, codebook init from encoder outputs, dead-code
  restarts (a VQ-VAE trained from a random codebook collapses to a few codes);
- VQ-Diffusion forward process q(z_t | z_0) and a per-sample-timestep transformer forward;
- EMA of weights, learning-rate schedule by fraction of the time budget, fp16 export, PSNR.

References: van den Oord et al. 2017 (VQ-VAE); Gu et al. 2022 (VQ-Diffusion, Eq. 4-5 for
q(z_t | z_0)); Ho et al. 2020 (DDPM).
"""

from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from g2d2.experiment.metrics import psnr

#: from_pretrained kwargs: fp16 files -> fp32 modules, no `accelerate` needed
LOAD_KWARGS = dict(torch_dtype=torch.float32, low_cpu_mem_usage=False)


def vq_config(tiny: bool = False) -> dict:
    """VQModel kwargs: 64 px in, downsampling 2 (two blocks), 32 x 32 tokens, 1024 codes.

    f = 2 because a 64 px thumbnail does not survive f = 4 with 1024 codes (each token would carry
    48 pixel values in 10 bits). No attention in the mid blocks: the decoder runs inside G2D2's
    inner loop (forward + backward each iteration), and 3x3 convolutions at 32 x 32 see enough
    context for a 2 x 2 patch code.
    """
    common = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64, mid_block_add_attention=False)
    if tiny:
        return dict(**common, block_out_channels=(16, 32), layers_per_block=1, latent_channels=8,
                    num_vq_embeddings=64, vq_embed_dim=8, norm_num_groups=8)
    return dict(**common, block_out_channels=(32, 96), layers_per_block=1, latent_channels=32,
                num_vq_embeddings=1024, vq_embed_dim=16, norm_num_groups=16)


def vq_token_side(vq_cfg: dict) -> int:
    """Side of the token grid of a VQModel config: sample_size / 2 ** (number of blocks - 1)."""
    return vq_cfg["sample_size"] // 2 ** (len(vq_cfg["block_out_channels"]) - 1)


def transformer_config(num_codes: int, token_side: int = 32, tiny: bool = False) -> dict:
    """Transformer2DModel kwargs in discrete mode: K + 1 classes (last = mask), unconditional."""
    width = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2) if tiny else dict(
        num_attention_heads=4, attention_head_dim=32, num_layers=4)
    return dict(**width, num_vector_embeds=num_codes + 1, sample_size=token_side, norm_type="ada_norm",
                num_embeds_ada_norm=100, cross_attention_dim=None, activation_fn="gelu", attention_bias=True,
                dropout=0.0)


def unet_config(tiny: bool = False) -> dict:
    """UNet2DModel kwargs at 64 px with self-attention at 16 px (and in the 8 px middle block)."""
    common = dict(sample_size=64, in_channels=3, out_channels=3,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    if tiny:
        return dict(**common, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                    attention_head_dim=8)
    return dict(**common, block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32,
                attention_head_dim=32)


# ----------------------------------------------------------------------------------------------- VQ-VAE


def vq_encode_latents(vq: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encoder + quant_conv: (B, 3, H, W) -> (B, D, h, w) continuous latents (fp32)."""
    return vq.encode(x).latents.float()


def vq_quantize(vq: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest-code quantisation in fp32.

    Args:
        z: (B, D, h, w) latents.
    Returns:
        z_q (B, D, h, w) straight-through quantised latents, codes (B, D, h, w) the selected codebook
        vectors (with gradient to the codebook), ids (B, h * w) long.
    """
    b, d, h, w = z.shape
    z = z.float()
    with torch.autocast(device_type=z.device.type, enabled=False):  # distances in fp32 even under autocast
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        book = vq.quantize.embedding.weight.float()  # (K, D)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.T + book.pow(2).sum(1)[None]
        ids = dist.argmin(1)
        codes = book[ids].reshape(b, h, w, d).permute(0, 3, 1, 2)
        z_q = z + (codes - z).detach()
    return z_q, codes, ids.reshape(b, h * w)


def vq_losses(vq: nn.Module, x: torch.Tensor, beta: float = 0.25) -> dict[str, torch.Tensor]:
    """Reconstruction + VQ losses of one batch.

    loss = mse(x_rec, x) + ||sg(z) - e||^2 (codebook) + beta ||z - sg(e)||^2 (commitment), the
    VQ-VAE objective with the weights the right way round (diffusers' VectorQuantizer keeps a
    `legacy` variant with beta on the codebook term instead).
    Returns dict with `loss`, `mse`, `vq`, `ids` (B, N), `z` (B, D, h, w), `x_rec`.
    """
    z = vq_encode_latents(vq, x)
    z_q, codes, ids = vq_quantize(vq, z)
    x_rec = vq.decode(z_q.to(x.dtype), force_not_quantize=True).sample
    mse = F.mse_loss(x_rec.float(), x.float())
    vq_loss = F.mse_loss(codes, z.detach()) + beta * F.mse_loss(z, codes.detach())
    return dict(loss=mse + vq_loss, mse=mse, vq=vq_loss, ids=ids, z=z, x_rec=x_rec)


@torch.no_grad()
def vq_reconstruct(vq: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction clamped to [-1, 1], token ids (B, N)) through the quantiser."""
    z_q, _, ids = vq_quantize(vq, vq_encode_latents(vq, x))
    return vq.decode(z_q.to(x.dtype), force_not_quantize=True).sample.float().clamp(-1, 1), ids


@torch.no_grad()
def init_codebook(vq: nn.Module, z: torch.Tensor, generator: torch.Generator) -> None:
    """Set the codebook to K random encoder outputs of the batch `z` (B, D, h, w) (k-means++-free init)."""
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    k = vq.quantize.embedding.weight.shape[0]
    pick = torch.randint(0, flat.shape[0], (k,), generator=generator, device=flat.device)
    jitter = 1e-3 * flat.std() * torch.randn(k, flat.shape[1], generator=generator, device=flat.device)
    vq.quantize.embedding.weight.copy_(flat[pick] + jitter)


def count_ids(ids: torch.Tensor, k: int) -> torch.Tensor:
    """(K,) float counts of the ids in `ids` (no host sync, unlike torch.bincount on CUDA)."""
    flat = ids.reshape(-1)
    return torch.zeros(k, device=ids.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


class DeadCodeRestarter:
    """Tracks code usage (EMA of the assignment frequency) and restarts unused codes.

    All tensor ops, no host synchronisation: `restart` replaces codes used less than
    `threshold / K` by random encoder outputs of the current batch.
    """

    def __init__(self, num_codes: int, device: torch.device, decay: float = 0.95, threshold: float = 0.05):
        self.usage = torch.full((num_codes,), 1.0 / num_codes, device=device)
        self.decay, self.threshold, self.k = decay, threshold, num_codes

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        counts = count_ids(ids, self.k)
        self.usage.mul_(self.decay).add_(counts / ids.numel(), alpha=1 - self.decay)

    def alive(self) -> int:
        """Number of codes above the restart threshold (host sync)."""
        return int((self.usage >= self.threshold / self.k).sum())

    @torch.no_grad()
    def restart(self, vq: nn.Module, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Restart dead codes from `z` (B, D, h, w); returns the (K,) bool mask of restarted codes."""
        dead = self.usage < self.threshold / self.k
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.randint(0, flat.shape[0], (self.k,), generator=generator, device=flat.device)
        weight = vq.quantize.embedding.weight
        weight.copy_(torch.where(dead[:, None], flat[pick].to(weight.dtype), weight))
        self.usage.copy_(torch.where(dead, torch.full_like(self.usage, 1.0 / self.k), self.usage))
        return dead


# -------------------------------------------------------------------------------------- VQ-Diffusion


def vq_diffusion_marginals(scheduler) -> torch.Tensor:
    """(T, 3) float64 [alpha_bar, beta_bar, gamma_bar] of q(z_t | z_0) from a VQDiffusionScheduler."""
    return torch.stack([scheduler.log_cumprod_at, scheduler.log_cumprod_bt, scheduler.log_cumprod_ct], 1).double().exp()


def q_sample_tokens(z0: torch.Tensor, t: torch.Tensor, marginals: torch.Tensor, num_codes: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Draw z_t ~ q(z_t | z_0) (VQ-Diffusion): mask w.p. gamma_bar, each of the K codes w.p. beta_bar,
    and z_0 kept with the remaining alpha_bar + beta_bar.

    Args:
        z0: (B, N) long codes in [0, K).
        t: (B,) long timesteps in [0, T).
        marginals: (T, 3) from `vq_diffusion_marginals`, on z0's device.
        num_codes: K (the mask id).
    Returns:
        (B, N) long in [0, K].
    """
    m = marginals[t].float()  # (B, 3)
    beta, gamma = m[:, 1:2], m[:, 2:3]
    u = torch.rand(z0.shape, generator=generator, device=z0.device)
    rnd = torch.randint(0, num_codes, z0.shape, generator=generator, device=z0.device)
    zt = torch.where(u < gamma + num_codes * beta, rnd, z0)
    return torch.where(u < gamma, torch.full_like(z0, num_codes), zt)


def _ada_norm_per_sample(self, x: torch.Tensor, timestep: torch.Tensor | None = None,
                         temb: torch.Tensor | None = None) -> torch.Tensor:
    # diffusers' AdaLayerNorm (chunk_dim 0) with one timestep per sample: emb (B, 2C) -> scale, shift (B, 1, C)
    temb = self.emb(timestep) if self.emb is not None else temb
    scale, shift = self.linear(self.silu(temb)).chunk(2, dim=-1)
    if scale.dim() == 2:
        scale, shift = scale[:, None], shift[:, None]
    return self.norm(x) * (1 + scale) + shift


def enable_per_sample_timesteps(transformer: nn.Module) -> nn.Module:
    """Let a Transformer2DModel with norm_type "ada_norm" take a (B,) timestep tensor (training only).

    diffusers' AdaLayerNorm splits its embedding along dim 0, so it only accepts one scalar timestep
    per forward; this patches the forward of each AdaLayerNorm instance (same weights, same result
    for a scalar timestep). Returns the model.
    """
    from diffusers.models.normalization import AdaLayerNorm

    for mod in transformer.modules():
        if isinstance(mod, AdaLayerNorm) and mod.chunk_dim == 0:
            mod.forward = types.MethodType(_ada_norm_per_sample, mod)
    return transformer


def transformer_logits(transformer: nn.Module, tokens: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """Unnormalised logits of p(z_0 | z_t): (B, N, K), the discrete Transformer2DModel forward
    without its final float64 log-softmax (cross-entropy takes logits directly).

    Args:
        tokens: (B, N) long in [0, K].
        t: int, 0-dim or (B,) long tensor (per-sample needs `enable_per_sample_timesteps`).
    """
    if not torch.is_tensor(t):
        t = torch.tensor(t, device=tokens.device, dtype=torch.long)
    h = transformer.latent_image_embedding(tokens)  # (B, N, C)
    for block in transformer.transformer_blocks:
        h = block(h, timestep=t)
    return transformer.out(transformer.norm_out(h))  # (B, N, K)


# --------------------------------------------------------------------------------------------- common


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers (fp32 copies)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # warm-up: average over the first steps instead of starting from the random init
        d = min(self.decay, (1 + step) / (10 + step))
        src = [p for p in model.parameters()]
        dst = [p for p in self.shadow.parameters()]
        torch._foreach_lerp_(dst, [s.float() for s in src], 1.0 - d)


def lr_factor(step: int, frac: float, warmup_steps: int = 200, final: float = 0.1) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `final` over the fraction of the time
    budget used (`frac` in [0, 1])."""
    warm = min(1.0, (step + 1) / warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))
    return warm * (final + (1 - final) * cos)


def save_fp16(model: nn.Module, path: str | Path) -> int:
    """save_pretrained an fp16 copy as safetensors; returns the number of parameters."""
    half = copy.deepcopy(model).cpu()
    for t in list(half.parameters()) + list(half.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float16)
    for p in half.parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"non-finite weights after fp16 conversion of {type(model).__name__}; not saving")
    half.save_pretrained(str(path), safe_serialization=True)
    # a model continued from a folder (--vq-continue, --transformer-continue) would record that folder's path
    config = Path(path) / "config.json"
    fields = json.loads(config.read_text())
    if fields.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return sum(p.numel() for p in model.parameters())


def bicubic_sr_psnr(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """PSNR of the naive SR baseline on `x` (B, 3, H, W): area down by `factor`, bicubic back up."""
    low = F.avg_pool2d(x.float(), factor)
    up = F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)
    return psnr(up, x)  # the runner's metric (g2d2.experiment.metrics)
