"""What the two discrete priors (VQ-Diffusion, aMUSEd) share: a diffusers `VQModel` whose codebook the
tokens index, loaded component by component from a checkpoint folder, and optional text prompts.

`CodebookPrior` holds the VQ side (relaxed and hard decode, encode to the nearest code) and the
per-image prompt cache; a subclass loads its networks, sets `self.vqvae` / `self.transformer`, calls
`_freeze(...)` and implements `log_p_x0`, `_embed_text` and `_use_prompt_embeddings`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from g2d2.priors.base import DiscretePrior, enable_checkpointing, freeze, network_autocast
from g2d2.priors.checkpoints import CheckpointError


def load_component(root: Path, component: str, loader: Callable[[str], Any], family: str, layout: str) -> Any:
    """`loader(root / component)`, or a CheckpointError naming the component, the folder and `layout`."""
    folder = root / component
    if not folder.is_dir():
        raise CheckpointError(f"{family} checkpoint {root} has no '{component}/' folder; expected layout: {layout}")
    try:
        return loader(str(folder))
    except Exception as err:  # noqa: BLE001 - re-raised with the component named
        raise CheckpointError(
            f"could not load the '{component}' component from {folder} ({type(err).__name__}: {err}); "
            f"expected layout: {layout}"
        ) from err


def _contiguous_output(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output in the default (NCHW) memory layout."""
    return output.contiguous()


def check_prompt_options(prompt: str | None, prompt_from_data: bool, guidance_scale: float) -> None:
    """Refuse a prompt together with prompt_from_data, and guidance without any prompt."""
    if prompt and prompt_from_data:
        raise ValueError(f"prompt={prompt!r} and prompt_from_data=true exclude each other; set one of them")
    if guidance_scale != 1.0 and not (prompt or prompt_from_data):
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a prompt; set prior.prompt, prior.prompt_from_data=true "
            "or guidance 1"
        )


class CodebookPrior(DiscretePrior):
    """A `DiscretePrior` over the codebook of `self.vqvae` (a diffusers VQModel).

    Subclasses set `vqvae`, `transformer`, `token_shape`, `precision`, `prompt_from_data` and, for
    per-image prompts, `_text` ({"tokenizer", "encoder"}) and `_prompt_embeddings` ({} at first).
    """

    #: the VQModel's image range: "[-1, 1]" (our convention, VQ-Diffusion) or "[0, 1]" (aMUSEd's VQ-GAN)
    vq_range = "[-1, 1]"

    def _freeze(self, gradient_checkpointing: bool, device: torch.device | str) -> None:
        """Cache the codebook E (K, d) in float32, freeze the networks, optionally checkpoint the VQ
        decoder's blocks, and move everything to `device`."""
        codebook = self.vqvae.quantize.embedding.weight.detach().float().clone()
        self.register_buffer("codebook", codebook, persistent=False)
        freeze(self.vqvae)
        freeze(self.transformer)
        # diffusers' attention blocks return their (B, C, H, W) output as a reshaped (B, HW, C) tensor, i.e.
        # channels-last; every decoder layer after one (all the high-resolution ones) would then run
        # channels-last, where CPU GroupNorm's forward + backward is several times slower
        for module in self.vqvae.modules():
            if isinstance(module, Attention):
                module.register_forward_hook(_contiguous_output)
        if gradient_checkpointing:
            enable_checkpointing(self.vqvae)
        self.to(device)

    # ---------------------------------------------------------------- text
    def _embed_text(self, text: str) -> Any:
        """The text conditioning of one prompt, on the CPU in float32 (what `_use_prompt_embeddings` takes)."""
        raise NotImplementedError

    def _use_prompt_embeddings(self, embeddings: list[Any]) -> None:
        """Condition the next `log_p_x0` calls on these per-image embeddings (one per image of the batch)."""
        raise NotImplementedError

    def set_prompts(self, prompts: list[str]) -> None:
        """Condition the next `log_p_x0` calls on one prompt per image (a batch of len(prompts)); each distinct
        prompt is encoded once."""
        if not self.prompt_from_data:
            raise RuntimeError("set_prompts needs a prior built with prompt_from_data=true (prior.prompt is fixed)")
        bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if not prompts or bad:
            raise ValueError(f"set_prompts needs one non-empty prompt per image, got {list(prompts)!r}")
        for p in prompts:
            if p not in self._prompt_embeddings:
                self._prompt_embeddings[p] = self._embed_text(p)
        self._use_prompt_embeddings([self._prompt_embeddings[p] for p in prompts])

    def _check_prompts(self, cond: torch.Tensor | None, batch: int) -> None:
        """With per-image prompts: `set_prompts` was called, with one prompt (or one per image) for this batch."""
        if not self.prompt_from_data:
            return
        if cond is None:
            raise RuntimeError("this prior takes per-image prompts: call set_prompts(prompts) before log_p_x0")
        if cond.shape[0] not in (1, batch):
            raise ValueError(f"set_prompts gave {cond.shape[0]} prompts for a batch of {batch} token maps")

    # ---------------------------------------------------------------- VQ decoder / encoder
    def _decode_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, d, N) code vectors, channels first -> images on the [-1, 1] scale. VQModel.decode(
        force_not_quantize=True) written out (post_quant_conv + decoder), so `lookup_from_codebook` configs cannot
        turn it into a lookup."""
        h, w = self.token_shape
        # NCHW: a (B, d, N) view with d innermost (the (B, N, K) relaxed decode, a codebook lookup) is channels-last,
        # which the decoder's layers would keep (see the attention hooks of _freeze)
        quant = emb.reshape(emb.shape[0], -1, h, w).to(self.vqvae.dtype).contiguous()  # (B, d, h, w), raster
        spatial = quant if self.vqvae.config.norm_type == "spatial" else None
        with network_autocast(self.precision, quant.device):
            image = self.vqvae.decoder(self.vqvae.post_quant_conv(quant), spatial)
        return 2.0 * image - 1.0 if self.vq_range == "[0, 1]" else image

    def decode(self, probs: torch.Tensor) -> torch.Tensor:
        """Relaxed decode: (B, K, N) probs -> E^T probs (B, d, N) -> decoder; differentiable w.r.t. probs.

        The product is a batched matmul on the memory layout probs has (an einsum would permute probs forward
        and backward): E^T probs for a (B, K, N) tensor, (probs^T E)^T for a (B, N, K) one seen as (B, K, N)
        (G2D2's working layout), whose gradient then comes back in that layout. Returns (B, 3, H, W) on the
        [-1, 1] scale, not clamped, float32 (float64 when probs are float64).
        """
        out_dtype = torch.promote_types(probs.dtype, torch.float32)
        probs, codebook = probs.to(out_dtype), self.codebook.to(out_dtype)
        if probs.stride(1) == 1 and probs.shape[1] > 1:  # codes contiguous: (B, N, K) memory
            emb = (probs.transpose(1, 2) @ codebook).transpose(1, 2)  # (B, d, N)
        else:
            emb = codebook.T @ probs  # (B, d, N)
        return self._decode_embeddings(emb).to(out_dtype)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) code ids -> (B, 3, H, W) float32 images clamped to [-1, 1]."""
        if (tokens >= self.num_codes).any() or (tokens < 0).any():
            raise ValueError(f"decode_tokens needs code ids in [0, {self.num_codes}), got mask or out-of-range ids")
        return self._decode_embeddings(self.codebook[tokens].transpose(1, 2)).float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (the VQModel's range) -> encoder + quant_conv -> nearest code ids (B, N)."""
        x = (x + 1.0) / 2.0 if self.vq_range == "[0, 1]" else x
        with network_autocast(self.precision, x.device):
            h = self.vqvae.quant_conv(self.vqvae.encoder(x.to(self.vqvae.dtype))).float()  # (B, d, h, w)
        z = h.flatten(2).transpose(1, 2)  # (B, N, d)
        dist = (z**2).sum(-1, keepdim=True) - 2 * z @ self.codebook.T + (self.codebook**2).sum(-1)  # (B, N, K)
        return dist.argmin(dim=-1)
