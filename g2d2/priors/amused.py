"""aMUSEd (an open MUSE / MaskGIT) as a `DiscretePrior`: VQ-GAN codebook + decoder, and a masked-token
U-ViT giving log p_theta(z_0 | z_t, text), so that G2D2 runs on it through the same solver code.

Patil, Cuenca, von Platen et al., "aMUSEd: An Open MUSE Reproduction", 2024 (checkpoints amused/amused-256
and amused/amused-512); Chang et al., "MUSE", ICML 2023; diffusers' AmusedPipeline, UVit2DModel,
AmusedScheduler.

Loaded component by component with diffusers / transformers classes; folder layout, as the hub's
`amused/amused-256` (a hub id resolved through the local cache, or a local folder):

    vqvae/          VQModel (VQ-GAN, f = 16, 8192 codes of dim 64, decodes to [0, 1])
    transformer/    UVit2DModel (codebook_size logits per token; no timestep input)
    scheduler/      AmusedScheduler (scheduler_config.json: mask_token_id, masking_schedule)
    text_encoder/   CLIPTextModelWithProjection (CLIP-L/14 text tower)
    tokenizer/      CLIPTokenizer
All five are required: the U-ViT always takes text inputs (its unconditional input is the empty prompt).

What maps to what (and what had to be decided):
- Codes and mask. K = vqvae num_vq_embeddings = transformer codebook_size (8192); our mask id is K (the
  `DiscretePrior` convention), translated to the scheduler's mask_token_id (8255 = vocab_size - 1 for aMUSEd)
  right before the U-ViT; tokens are (B, N) in raster order, the U-ViT takes them as (B, h, w).
- Time. The U-ViT has no timestep input: p(z_0 | z_t) depends on z_t only (which tokens are masked), so
  `log_p_x0` ignores t. The time grid exists only for the masking schedule: T = `num_timesteps` is the
  AmusedScheduler `set_timesteps(T)` grid, our time t is its timestep t (T-1 .. 0), and
  gamma_bar_t = m((T-1-t)/T) is the mask ratio of the input of timestep t, exactly as the scheduler's step
  computes it (g2d2/noise/mask_schedule.py); an absorbing process: no uniform replacement (beta_bar = 0),
  alpha_bar = 1 - gamma_bar. G2D2 with `num_steps = T` visits every timestep of the grid (prior.num_timesteps=12
  solver.num_steps=12 is AmusedPipeline's default 12-step grid); fewer steps visit a subset
  (t_i = round(linspace(T, 0, S+1)[1:]), as for VQ-Diffusion). The default T = 100 lets the G2D2 paper's
  100 outer steps run unchanged; the model is trained on continuous ratios r ~ U(0, 1), so any T is valid.
- Re-noising. `StarShaped` masks floor(N gamma_bar_s) tokens, the scheduler's mask_len = floor(N m) before
  its clamps (at least one, at most the previously masked count less one: those belong to its confidence-
  ordered Markov sampler, which G2D2 replaces). `MarkovPosterior` becomes MaskGIT's chain with uniformly
  random (not confidence-ordered) unmasking.
- p(z_0 | z_t). Masked positions: log_softmax of the U-ViT logits (guided); unmasked positions: the observed
  token with probability 1 (log 0 -> -70 for the others), as AmusedScheduler keeps them
  (pred_original_sample = where(masked, sample, z_t)) and as the absorbing process implies.
- Text and guidance. As AmusedPipeline: CLIP tokens padded to model_max_length; pooled_text_emb = text_embeds
  (projected pooled output), encoder_hidden_states = hidden_states[-2] (penultimate layer); the
  unconditional input is the empty prompt; guidance l = l_u + s (l_c - l_u) on the logits when s != 1
  (the pipeline guides for s > 1; its default s is 10). No prompt: the empty prompt is the condition.
- Micro-conditioning. micro_conds = [width, height, crop_top, crop_left, aesthetic_score] =
  [image_size, image_size, 0, 0, 6] (AmusedPipeline's defaults), in the text embeddings' dtype.
- Pixels. The VQ-GAN works on [0, 1] images (AmusedPipeline: VaeImageProcessor(do_normalize=False), output
  clipped to [0, 1]); our images are [-1, 1], so `encode` feeds (x + 1) / 2 and `decode` returns 2 D - 1.
- Precision. When the vqvae's config sets force_upcast, the VQ decoder stays float32 at fp16 / bf16 (as
  AmusedPipeline upcasts it: aMUSEd's VQ-GAN is known to produce NaNs in fp16).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from g2d2.noise.mask_schedule import absorbing_schedules, amused_mask_ratios
from g2d2.priors.base import freeze, network_autocast, precision_dtype
from g2d2.priors.checkpoints import CheckpointError, resolve_checkpoint
from g2d2.priors.codebook import CodebookPrior, check_prompt_options, load_component

logger = logging.getLogger(__name__)

LAYOUT = "vqvae/, transformer/, scheduler/, text_encoder/, tokenizer/ (all required), as in amused/amused-256"
#: log-probabilities are clamped here (log 0 -> -70), as for VQ-Diffusion
LOG_CLAMP = -70.0


def _load(component: str, root: Path, loader):  # noqa: ANN001 - any from_pretrained-like callable
    return load_component(root, component, loader, "aMUSEd", LAYOUT)


class AmusedPrior(CodebookPrior):
    """A text-conditioned aMUSEd prior (see the module docstring for the mapping).

    Args:
        path: a local folder or a Hugging Face id (see `resolve_checkpoint`).
        prompt: text prompt; None = the empty prompt (aMUSEd's unconditional input).
        guidance_scale: classifier-free guidance s, l = l_u + s (l_c - l_u) on the logits (1 = off).
        prompt_from_data: condition each image on its own prompt, given per batch by `set_prompts`.
        num_timesteps: T of the AmusedScheduler grid the masking schedule is laid on (>= 1).
        aesthetic_score: micro-conditioning target aesthetic score (AmusedPipeline: 6).
        crop_coord: micro-conditioning (top, left) crop coordinates (AmusedPipeline: (0, 0)).
        allow_download: let a missing hub id be downloaded.
        device: where the networks live.
        precision: "fp32" | "fp16" | "bf16" | "amp_fp16" | "amp_bf16" (see `g2d2.priors.base.PRECISIONS`).
        gradient_checkpointing: recompute the VQ decoder's block activations in the relaxed decode's backward.
    Raises:
        CheckpointError: a missing/unloadable component, named, or inconsistent sizes.
        ValueError: bad precision, num_timesteps, guidance without a prompt, or both prompt and prompt_from_data.
    """

    #: the VQ-GAN decodes to [0, 1] (AmusedPipeline: VaeImageProcessor(do_normalize=False)); see CodebookPrior
    vq_range = "[0, 1]"

    def __init__(
        self,
        path: str,
        prompt: str | None = None,
        guidance_scale: float = 1.0,
        prompt_from_data: bool = False,
        num_timesteps: int = 100,
        aesthetic_score: float = 6.0,
        crop_coord: tuple[int, int] | list[int] = (0, 0),
        allow_download: bool = False,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import AmusedScheduler, UVit2DModel, VQModel
        from diffusers.utils import is_accelerate_available
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        dtype = precision_dtype(precision)
        self.precision = precision
        check_prompt_options(prompt, prompt_from_data, guidance_scale)
        if not (isinstance(num_timesteps, int) and num_timesteps >= 1):
            raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
        if len(crop_coord) != 2:
            raise ValueError(f"crop_coord must be (top, left), got {crop_coord!r}")
        root = resolve_checkpoint(path, allow_download=allow_download)
        if not root.is_dir():
            raise CheckpointError(f"aMUSEd checkpoint {root} is not a folder; expected layout: {LAYOUT}")

        # 1. the components (the VQ-GAN stays float32 at half precision when its config says force_upcast)
        kw = {"torch_dtype": dtype, "low_cpu_mem_usage": is_accelerate_available()}
        self.vqvae = _load("vqvae", root, lambda p: VQModel.from_pretrained(p, **kw))
        if self.vqvae.config.get("force_upcast", False):
            self.vqvae.float()
        self.transformer = _load("transformer", root, lambda p: UVit2DModel.from_pretrained(p, **kw))
        scheduler = _load("scheduler", root, AmusedScheduler.from_pretrained)
        tokenizer = _load("tokenizer", root, CLIPTokenizer.from_pretrained)
        encoder = _load("text_encoder", root, CLIPTextModelWithProjection.from_pretrained)

        # 2. sizes: K codes, the mask id translation, the token grid
        self.num_codes = int(self.vqvae.config.num_vq_embeddings)
        tcfg = self.transformer.config
        self.mask_token_id = int(scheduler.config.mask_token_id)
        if tcfg.codebook_size != self.num_codes or not self.num_codes <= self.mask_token_id < tcfg.vocab_size:
            raise CheckpointError(
                f"inconsistent aMUSEd sizes in {root}: vqvae has {self.num_codes} codes, transformer codebook_size="
                f"{tcfg.codebook_size} and vocab_size={tcfg.vocab_size}, scheduler mask_token_id={self.mask_token_id} "
                "(need codebook_size = codes <= mask_token_id < vocab_size)"
            )
        side = int(tcfg.sample_size)
        self.token_shape = (side, side)
        self.image_size = side * 2 ** (len(self.vqvae.config.block_out_channels) - 1)

        # 3. the masking schedule as an absorbing process on AmusedScheduler's grid (float64 CPU tensors)
        self.num_timesteps = num_timesteps
        self.masking_schedule = str(scheduler.config.masking_schedule)
        for name, value in absorbing_schedules(amused_mask_ratios(num_timesteps, self.masking_schedule)).items():
            setattr(self, name, value)

        # 4. text conditioning: pooled (1, P) and hidden (1, L, D) embeddings, encoded once on the CPU in float32
        self.prompt, self.guidance_scale = prompt, float(guidance_scale)
        self.prompt_from_data = bool(prompt_from_data)
        self._set_text_conditioning(tokenizer, encoder, dtype)

        # 5. micro-conditioning, as AmusedPipeline builds it: (1, 5) in the text embeddings' dtype
        micro = [self.image_size, self.image_size, crop_coord[0], crop_coord[1], aesthetic_score]
        self.register_buffer("micro_conds", torch.tensor([micro], dtype=dtype), persistent=False)

        # 6. codebook, frozen networks, device
        self._freeze(gradient_checkpointing, device)
        logger.info(
            "aMUSEd prior from %s: K=%d codes, tokens %s, %d px, %s masking on T=%d, prompt=%r, guidance=%g, %s",
            root, self.num_codes, self.token_shape, self.image_size, self.masking_schedule, num_timesteps, prompt,
            guidance_scale, precision,
        )

    # ---------------------------------------------------------------- text
    def _set_text_conditioning(self, tokenizer, encoder, dtype: torch.dtype) -> None:  # noqa: ANN001 - CLIP classes
        """The buffers uncond_pooled / uncond_hidden (the empty prompt's) and cond_pooled / cond_hidden (the fixed
        prompt's, or None); keeps the text encoder for per-image prompts."""
        self._text = {"tokenizer": tokenizer, "encoder": freeze(encoder.float())}
        self._prompt_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        uncond_pooled, uncond_hidden = self._embed_text("")
        cond_pooled, cond_hidden = self._embed_text(self.prompt) if self.prompt else (None, None)
        if not self.prompt_from_data:  # the prompt is fixed: free the text encoder
            self._text = {}
        cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
        self.register_buffer("uncond_pooled", cast(uncond_pooled), persistent=False)  # (1, P)
        self.register_buffer("uncond_hidden", cast(uncond_hidden), persistent=False)  # (1, L, D)
        self.register_buffer("cond_pooled", cast(cond_pooled), persistent=False)  # (1 or B, P) or None
        self.register_buffer("cond_hidden", cast(cond_hidden), persistent=False)  # (1 or B, L, D) or None

    @torch.no_grad()
    def _embed_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_embeds (1, P), hidden_states[-2] (1, L, D)) of CLIPTextModelWithProjection, as AmusedPipeline."""
        tokenizer = self._text["tokenizer"]
        ids = tokenizer(
            [text], return_tensors="pt", padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
        ).input_ids
        out = self._text["encoder"](ids, return_dict=True, output_hidden_states=True)
        return out.text_embeds.float(), out.hidden_states[-2].float()

    def _use_prompt_embeddings(self, embeddings: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        like = self.uncond_hidden
        self.cond_pooled = torch.cat([pooled for pooled, _ in embeddings]).to(like.device, like.dtype)
        self.cond_hidden = torch.cat([hidden for _, hidden in embeddings]).to(like.device, like.dtype)

    # ---------------------------------------------------------------- transformer
    @torch.no_grad()
    def log_p_x0(self, tokens_t: torch.Tensor, t: int) -> torch.Tensor:
        """log p_theta(z0 | z_t) with classifier-free guidance; (B, N) long -> (B, K, N) float32.

        `t` is unused (the U-ViT has no timestep input). Unmasked tokens are kept with probability 1.
        """
        batch = tokens_t.shape[0]
        self._check_prompts(self.cond_hidden, batch)
        masked = tokens_t == self.mask_id  # (B, N)
        ids = torch.where(masked, self.mask_token_id, tokens_t).reshape(batch, *self.token_shape)  # (B, h, w)
        with network_autocast(self.precision, tokens_t.device):
            logits = self._guided_logits(ids)  # (B, K, N) float32
        log_p = torch.log_softmax(logits, dim=1).clamp(min=LOG_CLAMP)
        # unmasked positions: the observed token with probability 1
        kept = torch.nn.functional.one_hot(tokens_t.clamp(max=self.num_codes - 1), self.num_codes).permute(0, 2, 1)
        kept = torch.where(kept.bool(), 0.0, LOG_CLAMP)  # (B, K, N)
        return torch.where(masked.unsqueeze(1), log_p, kept)

    def _guided_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """U-ViT logits (B, K, N) float32, called as AmusedPipeline calls it, guided when s != 1."""
        batch = ids.shape[0]
        pooled = self.cond_pooled if self.cond_pooled is not None else self.uncond_pooled
        hidden = self.cond_hidden if self.cond_hidden is not None else self.uncond_hidden
        if self.guidance_scale == 1.0:
            # 1. a single pass: the prompt (or the empty prompt)
            logits = self.transformer(
                ids, micro_conds=self.micro_conds.expand(batch, -1), pooled_text_emb=pooled.expand(batch, -1),
                encoder_hidden_states=hidden.expand(batch, -1, -1),
            )
        else:
            # 2. one batched pass [uncond; cond], l = l_u + s (l_c - l_u) on the logits
            out = self.transformer(
                torch.cat([ids, ids]), micro_conds=self.micro_conds.expand(2 * batch, -1),
                pooled_text_emb=torch.cat([self.uncond_pooled.expand(batch, -1), pooled.expand(batch, -1)]),
                encoder_hidden_states=torch.cat(
                    [self.uncond_hidden.expand(batch, -1, -1), hidden.expand(batch, -1, -1)]
                ),
            )
            l_u, l_c = out.float().chunk(2)
            logits = l_u + self.guidance_scale * (l_c - l_u)
        return logits.float().flatten(2)  # (B, K, h, w) -> (B, K, N), raster order
