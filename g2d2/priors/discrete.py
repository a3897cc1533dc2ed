"""VQ-Diffusion as a `DiscretePrior`: VQ codebook + decoder, and a discrete transformer giving
log p_theta(z_0 | z_t, text) (Gu et al., "Vector Quantized Diffusion Model for Text-to-Image
Synthesis", CVPR 2022; Tang et al., "Improved Vector Quantized Diffusion Models", 2022, for the
learned classifier-free embeddings).

Loaded component by component with diffusers / transformers classes (the deprecated
`VQDiffusionPipeline.from_pretrained` breaks on the ITHQ model index). Folder layout, as
`microsoft/vq-diffusion-ithq` (a hub id resolved through the local cache, or a local folder):

    vqvae/          VQModel                                    required
    transformer/    Transformer2DModel (num_vector_embeds=K+1) required
    scheduler/      VQDiffusionScheduler (scheduler_config.json) required
    text_encoder/   CLIPTextModel                              required for a prompt (*)
    tokenizer/      CLIPTokenizer                              required for a prompt (*)
    learned_classifier_free_sampling_embeddings/               optional (null text for guidance)

(*) and for a text-conditioned transformer without a learnable null embedding, whose
unconditional input is then the encoded empty prompt.

A folder with only the first three is an unconditional prior (transformer without
cross-attention): the layout of the embedded tiny prior.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from g2d2.noise.vq_schedule import vq_diffusion_schedules
from g2d2.priors.base import freeze, network_autocast, per_device, precision_dtype
from g2d2.priors.checkpoints import CheckpointError, resolve_checkpoint
from g2d2.priors.codebook import CodebookPrior, check_prompt_options, load_component

logger = logging.getLogger(__name__)

REQUIRED = ("vqvae", "transformer", "scheduler")
LAYOUT = (
    "vqvae/, transformer/, scheduler/ (required), text_encoder/ + tokenizer/ (for a prompt), "
    "learned_classifier_free_sampling_embeddings/ (optional), as in microsoft/vq-diffusion-ithq"
)
#: log-probabilities are clamped here (log 0 -> -70), as in the reference code
LOG_CLAMP = -70.0


def _load(component: str, root: Path, loader):  # noqa: ANN001 - any from_pretrained-like callable
    return load_component(root, component, loader, "VQ-Diffusion", LAYOUT)


class VQDiffusionPrior(CodebookPrior):
    """A (text-conditioned or unconditional) VQ-Diffusion prior.

    Args:
        path: `embedded:<name>`, a local folder or a Hugging Face id (see `resolve_checkpoint`).
        prompt: text prompt (needs text_encoder/ and tokenizer/); None = unconditional.
        prompt_from_data: condition each image on its own prompt, given per batch by `set_prompts`
            (the runner passes the data set's prompts, e.g. "a photo of <class>" for data=imagenet);
            the text encoder then stays on the CPU and encodes each distinct prompt once.
        guidance_scale: classifier-free guidance s, l = l_u + s (l_c - l_u) in log space (1 = off).
        allow_download: let a missing hub id be downloaded.
        device: where the networks live.
        precision: "fp32" | "fp16" | "bf16" weights of the networks, or "amp_fp16" | "amp_bf16" (float32
            weights, networks run under autocast); codebook, logits and decode outputs stay float32.
        gradient_checkpointing: recompute the VQ decoder's block activations in the backward pass of
            the relaxed decode (less memory for G2D2; same gradients, slower).
    Raises:
        CheckpointError: a missing/unloadable component, named.
        ValueError: bad precision, guidance without a prompt, or both prompt and prompt_from_data.
    """

    def __init__(
        self,
        path: str,
        prompt: str | None = None,
        guidance_scale: float = 1.0,
        prompt_from_data: bool = False,
        allow_download: bool = False,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel
        from diffusers.utils import is_accelerate_available

        dtype = precision_dtype(precision)
        self.precision = precision
        check_prompt_options(prompt, prompt_from_data, guidance_scale)
        root = resolve_checkpoint(path, allow_download=allow_download)
        if not root.is_dir():
            raise CheckpointError(f"VQ-Diffusion checkpoint {root} is not a folder; expected layout: {LAYOUT}")

        # 1. the three required components
        kw = {"torch_dtype": dtype, "low_cpu_mem_usage": is_accelerate_available()}
        self.vqvae = _load("vqvae", root, lambda p: VQModel.from_pretrained(p, **kw))
        self.transformer = _load("transformer", root, lambda p: Transformer2DModel.from_pretrained(p, **kw))
        scheduler = _load("scheduler", root, VQDiffusionScheduler.from_pretrained)
        if not getattr(self.transformer, "is_input_vectorized", False):
            raise CheckpointError(f"{root / 'transformer'} is not a discrete (num_vector_embeds) transformer")

        # 2. sizes and schedules (float64, from the scheduler's config)
        self.num_codes = int(self.vqvae.config.num_vq_embeddings)
        if self.transformer.config.num_vector_embeds != self.num_codes + 1:
            raise CheckpointError(
                f"transformer has num_vector_embeds={self.transformer.config.num_vector_embeds}, expected "
                f"codes + mask = {self.num_codes + 1} for the {self.num_codes}-code vqvae in {root}"
            )
        self.token_shape = (int(self.transformer.height), int(self.transformer.width))
        down = 2 ** (len(self.vqvae.config.block_out_channels) - 1)
        self.image_size = self.token_shape[0] * down
        cfg = scheduler.config
        self.num_timesteps = int(cfg.num_train_timesteps)
        self._timestep_ids_on: dict[str, torch.Tensor] = {}
        for name, value in vq_diffusion_schedules(
            self.num_timesteps, self.num_codes, cfg.alpha_cum_start, cfg.alpha_cum_end,
            cfg.gamma_cum_start, cfg.gamma_cum_end,
        ).items():
            setattr(self, name, value)  # (T,) float64 CPU tensors, not buffers: they never move

        # 3. text conditioning (optional): fixed text inputs, computed once
        self.prompt, self.guidance_scale = prompt, float(guidance_scale)
        self.prompt_from_data = bool(prompt_from_data)
        self._set_text_conditioning(root, dtype, kw["low_cpu_mem_usage"])

        # 4. codebook, frozen networks, device
        self._freeze(gradient_checkpointing, device)
        logger.info(
            "VQ-Diffusion prior from %s: K=%d codes, tokens %s, T=%d, prompt=%r, guidance=%g, %s",
            root, self.num_codes, self.token_shape, self.num_timesteps, prompt, guidance_scale, precision,
        )

    # ---------------------------------------------------------------- text
    def _set_text_conditioning(self, root: Path, dtype: torch.dtype, low_cpu_mem_usage: bool) -> None:
        """The buffers cond_embedding (the fixed prompt's) and uncond_embedding (the learned null text, or the
        empty prompt's), None for an unconditional transformer; keeps the text encoder for per-image prompts."""
        prompt, prompt_from_data = self.prompt, self.prompt_from_data
        # tokenizer + text encoder, in a plain dict (not a submodule: .to(device) leaves the encoder on the CPU)
        self._text: dict[str, object] = {}
        self._prompt_embeddings: dict[str, torch.Tensor] = {}  # per-image prompts, encoded once (CPU)
        cond = uncond = None
        if self.transformer.config.cross_attention_dim is None:
            if prompt or prompt_from_data:
                raise CheckpointError(
                    f"{'prompt ' + repr(prompt) if prompt else 'prompt_from_data'} given but the transformer in "
                    f"{root} is unconditional"
                )
        else:
            uncond = self._learned_null_embedding(root, low_cpu_mem_usage)
            if prompt or prompt_from_data or uncond is None:
                from transformers import CLIPTextModel, CLIPTokenizer

                # the text encoder stays float32 on the CPU: it runs once per prompt, not per step
                self._text = {
                    "tokenizer": _load("tokenizer", root, CLIPTokenizer.from_pretrained),
                    "encoder": freeze(_load("text_encoder", root, CLIPTextModel.from_pretrained).float()),
                }
            if uncond is None:
                uncond = self._embed_text("")  # no learned null text: the empty prompt
            if prompt:
                cond = self._embed_text(prompt)
            uncond = uncond.to(dtype)
            cond = cond.to(dtype) if cond is not None else None
            if not prompt_from_data:  # the prompt is fixed: free the text encoder
                self._text = {}
        self.register_buffer("cond_embedding", cond, persistent=False)  # (1, L, D) or None
        self.register_buffer("uncond_embedding", uncond, persistent=False)  # (1, L, D) or None

    @torch.no_grad()
    def _embed_text(self, text: str) -> torch.Tensor:
        """CLIP last hidden state, L2-normalised per token as in VQ-Diffusion: (1, L, D)."""
        tokenizer = self._text["tokenizer"]
        ids = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        hidden = self._text["encoder"](ids)[0].float()
        return hidden / hidden.norm(dim=-1, keepdim=True)

    def _use_prompt_embeddings(self, embeddings: list[torch.Tensor]) -> None:
        cond = torch.cat(embeddings)  # (B, L, D)
        self.cond_embedding = cond.to(device=self.uncond_embedding.device, dtype=self.uncond_embedding.dtype)

    @staticmethod
    def _learned_null_embedding(root: Path, low_cpu_mem_usage: bool) -> torch.Tensor | None:
        """The learned classifier-free null text (1, L, D), or None when absent or not learnable."""
        folder = root / "learned_classifier_free_sampling_embeddings"
        if not folder.is_dir():
            return None
        from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
            LearnedClassifierFreeSamplingEmbeddings,
        )

        load = LearnedClassifierFreeSamplingEmbeddings.from_pretrained
        learned = _load(folder.name, root, lambda p: load(p, low_cpu_mem_usage=low_cpu_mem_usage))
        return learned.embeddings.detach().float().unsqueeze(0) if learned.learnable else None

    # ---------------------------------------------------------------- transformer
    @torch.no_grad()
    def log_p_x0(self, tokens_t: torch.Tensor, t: int) -> torch.Tensor:
        """log p_theta(z0 | z_t) with classifier-free guidance; (B, N) long -> (B, K, N) float32."""
        batch = tokens_t.shape[0]
        self._check_prompts(self.cond_embedding, batch)
        # one timestep per batch (ada_norm), a view of a device table: no host-to-device copy per step
        timestep = self._timestep_ids(tokens_t.device)[int(t)]
        with network_autocast(self.precision, tokens_t.device):
            logits = self._guided_logits(tokens_t, timestep)
        return (logits - torch.logsumexp(logits, dim=1, keepdim=True)).clamp(min=LOG_CLAMP)

    def _guided_logits(self, tokens_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Transformer logits (B, K, N) float32, with classifier-free guidance when it is on."""
        batch = tokens_t.shape[0]
        # return_dict=False: diffusers' Transformer2DModelOutput warns (FutureWarning) on every construction
        if self.uncond_embedding is None:
            # 1. unconditional transformer: no text input at all
            (logits,) = self.transformer(tokens_t, timestep=timestep, return_dict=False)
        elif self.cond_embedding is None or self.guidance_scale == 1.0:
            # 2. a single pass: the prompt, or the null text when there is no prompt
            text = self.cond_embedding if self.cond_embedding is not None else self.uncond_embedding
            (logits,) = self.transformer(
                tokens_t, encoder_hidden_states=text.expand(batch, -1, -1), timestep=timestep, return_dict=False
            )
        else:
            # 3. guidance in log space, l = l_u + s (l_c - l_u), one batched pass, renormalised
            text = torch.cat([self.uncond_embedding.expand(batch, -1, -1), self.cond_embedding.expand(batch, -1, -1)])
            (out,) = self.transformer(
                torch.cat([tokens_t, tokens_t]), encoder_hidden_states=text, timestep=timestep, return_dict=False
            )
            l_u, l_c = out.float().chunk(2)
            logits = l_u + self.guidance_scale * (l_c - l_u)
        return logits.float()

    def _timestep_ids(self, device: torch.device) -> torch.Tensor:
        """arange(T) on `device`, made once per device."""
        return per_device(self._timestep_ids_on, device, lambda: torch.arange(self.num_timesteps, device=device))
