"""The two prior interfaces solvers talk to. Solvers never touch the networks directly.

Both are `torch.nn.Module`s so `.to(device)` moves everything; all weights are frozen
(`requires_grad=False`): solvers differentiate through a prior's *computation* where they need to
(G2D2 through `decode`, DPS through `eps`), never w.r.t. its parameters.

Conventions: images (B, 3, H, W) float in [-1, 1]; tokens (B, N) long with N = h * w token grid
positions in raster order; the mask token of a discrete prior is `num_codes` (the last class).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

T = TypeVar("T")


class DiscretePrior(nn.Module):
    """A discrete (token) diffusion prior: VQ codebook + decoder + transformer over tokens.

    Attributes a subclass must set:
        num_codes: K, the number of real codebook entries (mask token id = K).
        token_shape: (h, w) of the token grid; N = h * w.
        image_size: side length of the images `decode` produces.
        num_timesteps: T of the discrete diffusion (t = 0 .. T-1).
        log_cumprod_at, log_cumprod_bt, log_cumprod_ct: (T,) float64 tensors, log of the cumulative
            schedules alpha_bar_t, beta_bar_t, gamma_bar_t of q(z_t | z_0) (VQ-Diffusion): z_t keeps
            z_0 with prob. alpha_bar + beta_bar, becomes each other code with prob. beta_bar, and
            becomes the mask with prob. gamma_bar.
        log_at, log_bt, log_ct: (T,) per-step (non-cumulative) schedules of q(z_t | z_{t-1}).
    """

    num_codes: int
    token_shape: tuple[int, int]
    image_size: int
    num_timesteps: int
    #: True when the prior is conditioned on a prompt per image, set by the runner through `set_prompts`
    prompt_from_data: bool = False

    def set_prompts(self, prompts: list[str]) -> None:
        """Condition the next solves on one text prompt per image of the batch (prompt_from_data priors)."""
        raise NotImplementedError(f"{type(self).__name__} takes no per-image prompts")

    @property
    def num_tokens(self) -> int:
        return self.token_shape[0] * self.token_shape[1]

    @property
    def mask_id(self) -> int:
        return self.num_codes

    def log_p_x0(self, tokens_t: torch.Tensor, t: int) -> torch.Tensor:
        """log p_theta(z_0 | z_t) from the transformer, without gradient.

        Args:
            tokens_t: (B, N) long in [0, K] (K = mask).
            t: the diffusion time, one int for the whole batch.
        Returns:
            (B, K, N) float32 log-probabilities, normalised over K.
        """
        raise NotImplementedError

    def decode(self, probs: torch.Tensor) -> torch.Tensor:
        """Relaxed decode: (B, K, N) probabilities (or one-hot) -> codebook mixture -> decoder.

        Differentiable w.r.t. `probs`; the quantiser is bypassed. Returns (B, 3, H, W), not clamped.
        """
        raise NotImplementedError

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hard decode of (B, N) code ids (no mask ids) to images (B, 3, H, W) clamped to [-1, 1]."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> (B, N) code ids of the nearest codebook entries."""
        raise NotImplementedError


class PixelPrior(nn.Module):
    """A pixel-space DDPM/ADM prior with a noise-prediction network.

    Attributes a subclass must set:
        image_size: side length of the images the network was trained on.
        alphas_cumprod: (T,) float64 tensor, alpha_bar_t of the training schedule.
        num_train_timesteps: T.
        learned_variance: whether `predict` returns a learned log-variance.
    """

    image_size: int
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    learned_variance: bool

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Predicted noise eps_theta(x_t, t), (B, 3, H, W). Differentiable w.r.t. x_t."""
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, log_variance) where log_variance is the model's learned-range posterior log-variance
        of p(x_{t-1} | x_t) (B, 3, H, W), or None for a fixed-variance model."""
        raise NotImplementedError


#: the `precision` option of every prior -> the dtype its networks' weights are stored in. fp16 / bf16
#: cast the weights (half the weight memory); amp_fp16 / amp_bf16 keep float32 weights and run the
#: networks under torch.autocast in the half dtype (mixed precision). Logits and losses stay float32.
PRECISIONS = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "amp_fp16": torch.float32, "amp_bf16": torch.float32,
}
#: the autocast compute dtype of the mixed-precision names
AUTOCAST = {"amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    """Weight dtype of a `precision` name; a clear ValueError listing the accepted names otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def network_autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context a prior runs its networks in: torch.autocast to the half dtype for amp_fp16 /
    amp_bf16 on `device`'s type, a no-op context for the plain precisions."""
    dtype = AUTOCAST.get(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def freeze(module: nn.Module) -> nn.Module:
    """Put a network in eval mode with all parameters frozen; returns it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def per_device(cache: dict[str, T], device: torch.device | str, build: Callable[[], T]) -> T:
    """`cache[str(device)]`, built by `build()` the first time: tables a prior keeps on each device it
    runs on, so a sampling step indexes them there instead of copying them from the host."""
    key = str(device)
    if key not in cache:
        cache[key] = build()
    return cache[key]


def enable_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on diffusers' gradient checkpointing in every block of `model` that implements it.

    Activations of those blocks are recomputed during the backward pass instead of stored: less
    memory for the solvers that differentiate through the network (DPS through the UNet, G2D2
    through the VQ decoder) at the cost of a second forward; gradients are unchanged. Non-reentrant
    torch checkpointing, so gradients reach the input even though the weights are frozen. (VQModel
    does not advertise support, but its decoder blocks implement it: the mixin's setter is used.)
    """
    from diffusers.models.modeling_utils import ModelMixin

    if not isinstance(model, ModelMixin):
        raise TypeError(f"gradient checkpointing needs a diffusers model, got {type(model).__name__}")

    def checkpoint(module: nn.Module, *args):  # noqa: ANN202 - what the blocks call
        return torch_checkpoint(module.__call__, *args, use_reentrant=False)

    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint)
    return model
