"""Random-weight checkpoints with the shapes of the real priors, for the benchmark.

Memory and time of a network do not depend on its weights, so the benchmark builds each prior's
architecture with random weights and saves it in the folder layout our loaders read; the row then
loads it through conf/prior/<name>.yaml with `prior.path` pointing at that folder. Nothing is downloaded.

Shapes ("full" scale), from the public configs:
    VQ-Diffusion ITHQ (microsoft/vq-diffusion-ithq, converted by diffusers'
    scripts/convert_vq_diffusion_to_diffusers.py from VQ-Diffusion's configs/ithq.yaml and
    OUTPUT/pretrained_model/taming_dvae/config.yaml):
        VQModel: ch 64, ch_mult (1, 2, 4, 8) -> block_out_channels (64, 128, 256, 512) (f = 8),
            2 res blocks per level, z_channels 256 (latent_channels), embed_dim 128 (vq_embed_dim),
            4096 codes, attention at 32 x 32 (last encoder level, first decoder level, plus the mid blocks);
        Transformer2DModel: 36 layers, n_embd 1408 = 16 heads x 88, cross-attention 512 (CLIP),
            4096 + 1 (mask) vector embeddings, 32 x 32 tokens, ada_norm over 100 steps, GELU MLP x4
            ("geglu-approximate"), attention bias;
        CLIPTextModel ViT-B/32 text tower: 12 layers, width 512, 8 heads, MLP 2048, 77 tokens, vocab 49408;
        tokenizer: a toy CLIP BPE vocabulary (the real one only changes which ids a prompt gets).
    aMUSEd 256 / 512 (amused/amused-256, amused/amused-512, from diffusers' scripts/convert_amused.py and the
    open-MUSE transformer config it converts; the U-ViT defaults of diffusers' UVit2DModel are these values):
        VQModel (VQ-GAN): block_out_channels (128, 256, 256, 512, 768) (f = 16), 2 res blocks per level,
            latent_channels 64 (= code dim), 8192 codes, no mid-block attention, lookup_from_codebook;
            force_upcast set (an assumption: AmusedPipeline keeps the decoder fp32 under it, and aMUSEd's
            README warns of NaNs in fp16);
        UVit2DModel: hidden 1024, 22 layers x 16 heads, MLP 2816 (GEGLU), 768-channel conv embedding with 3 res +
            attention blocks (12 heads) before and after, cross-attention to 768-d CLIP states, pooled text 768
            + micro-conditioning 5 x 256, vocab 8256 (mask token 8255), codebook 8192, no biases; 16 x 16
            tokens (256), or 32 x 32 tokens down/upsampled to 16 x 16 around the layers (512);
        CLIPTextModelWithProjection, CLIP ViT-L/14 text tower: 12 layers, width 768, 12 heads, MLP 3072, 77
            tokens, vocab 49408, projection 768; AmusedScheduler(mask_token_id=8255, cosine).
    ADM pixel priors (g2d2.priors.guided_diffusion): DPS's ffhq_10m and ADM ImageNet 256 uncond as
    diffusers UNet2DModel, learned-range variance (6 output channels), linear betas, T = 1000.
"tiny" scale keeps every block type but shrinks widths and depths, and the images to 16 px (VQ) and
32 px (ADM: six levels down to 1 px) for the CPU smoke test. "cpu" scale (VQ-Diffusion only) keeps ITHQ's
256 px images, 32 x 32 tokens and 4096 codes with narrow networks: G2D2's CPU cost at the paper's shapes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from g2d2.priors.guided_diffusion import ffhq_10m_config, imagenet256_uncond_config, unet2d_config

#: VQ-Diffusion shapes per scale: (vqvae kwargs, transformer kwargs, CLIP text kwargs)
VQ_SHAPES = {
    "full": (
        dict(
            block_out_channels=(64, 128, 256, 512), layers_per_block=2, latent_channels=256,
            num_vq_embeddings=4096, vq_embed_dim=128, norm_num_groups=32, sample_size=256,
            down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        ),
        dict(
            num_attention_heads=16, attention_head_dim=88, num_layers=36, cross_attention_dim=512,
            num_vector_embeds=4097, sample_size=32, num_embeds_ada_norm=100, norm_type="ada_norm",
            activation_fn="geglu-approximate", attention_bias=True, norm_num_groups=32, dropout=0.0,
        ),
        dict(
            vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=512,
        ),
    ),
    "tiny": (
        dict(
            block_out_channels=(32, 64), layers_per_block=1, latent_channels=8, num_vq_embeddings=16,
            vq_embed_dim=8, norm_num_groups=32, sample_size=16,
            down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
            up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        ),
        dict(
            num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=32,
            num_vector_embeds=17, sample_size=8, num_embeds_ada_norm=100, norm_type="ada_norm",
            activation_fn="geglu-approximate", attention_bias=True, norm_num_groups=32, dropout=0.0,
        ),
        dict(
            vocab_size=256, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        ),
    ),
}
# "cpu": ITHQ's component classes, image size (256 px), f = 8, token grid (32 x 32) and codebook (4096 codes), with
# narrow networks (decoder channels 32 / 32 / 64 / 64, dimension-64 codes, 2 transformer layers): G2D2's inner loop
# at the paper's shapes of logits and images, at a cost one CPU thread measures in minutes
VQ_SHAPES["cpu"] = (
    dict(VQ_SHAPES["full"][0], block_out_channels=(32, 32, 64, 64), latent_channels=64, vq_embed_dim=64),
    dict(VQ_SHAPES["full"][1], num_layers=2, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=32),
    VQ_SHAPES["tiny"][2],
)
#: timesteps of the VQ-Diffusion scheduler (ITHQ: 100) at every scale, so G2D2 runs its paper settings
VQ_TIMESTEPS = 100
TEXT_LENGTH = 77

_AMUSED_VQ = dict(
    block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2, latent_channels=64, num_vq_embeddings=8192,
    norm_num_groups=32, sample_size=32, down_block_types=("DownEncoderBlock2D",) * 5,
    up_block_types=("UpDecoderBlock2D",) * 5, mid_block_add_attention=False, lookup_from_codebook=True,
    force_upcast=True,
)
_AMUSED_UVIT = dict(
    hidden_size=1024, use_bias=False, cond_embed_dim=768, micro_cond_encode_dim=256, micro_cond_embed_dim=1280,
    encoder_hidden_size=768, vocab_size=8256, codebook_size=8192, in_channels=768, block_out_channels=768,
    num_res_blocks=3, block_num_heads=12, num_hidden_layers=22, num_attention_heads=16, intermediate_size=2816,
    layer_norm_eps=1e-6, ln_elementwise_affine=True,
)
_AMUSED_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
_TINY_AMUSED_VQ = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=8, num_vq_embeddings=16, norm_num_groups=32,
    sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True,
)
_TINY_AMUSED_UVIT = dict(
    hidden_size=32, use_bias=False, cond_embed_dim=32, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
    encoder_hidden_size=32, vocab_size=20, codebook_size=16, in_channels=32, block_out_channels=32, num_res_blocks=1,
    block_num_heads=2, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
)
_TINY_AMUSED_TEXT = dict(
    vocab_size=256, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
)
#: aMUSEd shapes: conf/prior name -> scale -> (vqvae kwargs, UVit2DModel kwargs, CLIP text kwargs, mask token id).
#: amused_512 = amused_256's components with 32 x 32 tokens and the U-ViT's down/upsampling
AMUSED_SHAPES = {
    name: {
        "full": (_AMUSED_VQ, {**_AMUSED_UVIT, "sample_size": side, "downsample": down, "upsample": down},
                 _AMUSED_TEXT, 8255),
        "tiny": (_TINY_AMUSED_VQ, {**_TINY_AMUSED_UVIT, "sample_size": 8, "downsample": down, "upsample": down},
                 _TINY_AMUSED_TEXT, 19),
    }
    for name, side, down in (("amused_256", 16, False), ("amused_512", 32, True))
}

#: pixel priors: name -> (guided-diffusion architecture factory, full width)
ADM_SHAPES = {"adm_ffhq": ffhq_10m_config, "adm_imagenet": imagenet256_uncond_config}
TINY_ADM_WIDTH, TINY_IMAGE_SIZE = 32, 32


def _write_toy_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE tokenizer (any lowercase prompt tokenises) saved to `folder`."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789-.,'":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    src = folder.parent / "tokenizer_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    try:  # transformers 5: a tokenizers-backed CLIPTokenizer takes the files as `vocab` / `merges`
        tok = CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), model_max_length=TEXT_LENGTH)
    except Exception:  # noqa: BLE001 - transformers 4: the slow tokenizer's argument names
        tok = CLIPTokenizer(
            vocab_file=str(src / "vocab.json"), merges_file=str(src / "merges.txt"), model_max_length=TEXT_LENGTH
        )
    tok.save_pretrained(str(folder))


def _save(model: torch.nn.Module, folder: Path, dtype: torch.dtype) -> int:
    """save_pretrained in `dtype` (moved to the CPU first); returns the parameter count."""
    model.to(device="cpu", dtype=dtype).save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def write_vq_diffusion(root: Path, scale: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Save a random VQ-Diffusion with the ITHQ layout (vqvae/ transformer/ scheduler/ text_encoder/
    tokenizer/ learned_classifier_free_sampling_embeddings/) under `root`.

    The networks are built on `device` (fast random init on a GPU) and saved in `dtype`; the loader
    casts them to the benchmarked precision. Returns parameter counts and the shape description.
    """
    from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    vq_kw, tr_kw, text_kw = VQ_SHAPES[scale]
    root.mkdir(parents=True, exist_ok=True)
    params = {}
    with torch.device(device):
        params["vqvae"] = _save(VQModel(**vq_kw), root / "vqvae", dtype)
        params["transformer"] = _save(Transformer2DModel(**tr_kw), root / "transformer", dtype)
        text = CLIPTextModel(CLIPTextConfig(**text_kw, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        params["text_encoder"] = _save(text, root / "text_encoder", dtype)
        null = LearnedClassifierFreeSamplingEmbeddings(
            learnable=True, hidden_size=text_kw["hidden_size"], length=TEXT_LENGTH
        )
        with torch.no_grad():
            null.embeddings.normal_()
        _save(null, root / "learned_classifier_free_sampling_embeddings", torch.float32)
    VQDiffusionScheduler(
        num_vec_classes=tr_kw["num_vector_embeds"], num_train_timesteps=VQ_TIMESTEPS
    ).save_pretrained(str(root / "scheduler"))
    _write_toy_tokenizer(root / "tokenizer")
    down = 2 ** (len(vq_kw["block_out_channels"]) - 1)
    inner = tr_kw["num_attention_heads"] * tr_kw["attention_head_dim"]
    label = {"full": "ITHQ", "cpu": "ITHQ-shaped, narrow", "tiny": "tiny"}[scale]
    shape = (
        f"VQ-Diffusion {label}: transformer {tr_kw['num_layers']}x{inner} "
        f"({params['transformer'] / 1e6:.0f}M), VQ f{down} {vq_kw['num_vq_embeddings']} codes "
        f"({params['vqvae'] / 1e6:.0f}M), CLIP text ({params['text_encoder'] / 1e6:.0f}M)"
    )
    return {"params": params, "shape": shape, "image_size": tr_kw["sample_size"] * down}


def write_amused(root: Path, name: str, scale: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Save a random aMUSEd (`name` = "amused_256" | "amused_512") in the hub layout (vqvae/ transformer/
    scheduler/ text_encoder/ tokenizer/) under `root`; built on `device`, saved in `dtype`, as `write_vq_diffusion`."""
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vq_kw, uvit_kw, text_kw, mask_token_id = AMUSED_SHAPES[name][scale]
    root.mkdir(parents=True, exist_ok=True)
    params = {}
    with torch.device(device):
        params["vqvae"] = _save(VQModel(**vq_kw), root / "vqvae", dtype)
        params["transformer"] = _save(UVit2DModel(**uvit_kw), root / "transformer", dtype)
        text = CLIPTextModelWithProjection(CLIPTextConfig(**text_kw, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        params["text_encoder"] = _save(text, root / "text_encoder", dtype)
    AmusedScheduler(mask_token_id=mask_token_id).save_pretrained(str(root / "scheduler"))
    _write_toy_tokenizer(root / "tokenizer")
    down = 2 ** (len(vq_kw["block_out_channels"]) - 1)
    side = uvit_kw["sample_size"]
    shape = (
        f"aMUSEd {name.split('_')[1]}{'' if scale == 'full' else ' tiny'}: U-ViT {uvit_kw['num_hidden_layers']}x"
        f"{uvit_kw['hidden_size']} on {side}x{side} tokens ({params['transformer'] / 1e6:.0f}M), VQ f{down} "
        f"{vq_kw['num_vq_embeddings']} codes ({params['vqvae'] / 1e6:.0f}M), "
        f"CLIP text ({params['text_encoder'] / 1e6:.0f}M)"
    )
    return {"params": params, "shape": shape, "image_size": side * down}


def adm_unet_kwargs(name: str, scale: str) -> dict:
    """UNet2DModel kwargs of the ADM architecture `name` ("adm_ffhq" | "adm_imagenet") at `scale`."""
    make = ADM_SHAPES[name]
    cfg = make() if scale == "full" else replace(make(model_channels=TINY_ADM_WIDTH), image_size=TINY_IMAGE_SIZE)
    return unet2d_config(cfg)


def write_adm(root: Path, name: str, scale: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Save a random ADM-shaped UNet2DModel + DDPM scheduler (unet/ + scheduler/) under `root`."""
    from diffusers import DDPMScheduler, UNet2DModel

    kwargs = adm_unet_kwargs(name, scale)
    root.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        n = _save(UNet2DModel(**kwargs), root / "unet", dtype)
    DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        variance_type="learned_range",
    ).save_pretrained(str(root / "scheduler"))
    label = {"adm_ffhq": "ADM FFHQ (ffhq_10m)", "adm_imagenet": "ADM ImageNet 256 uncond"}[name]
    if scale != "full":
        label += " tiny"
    width = kwargs["block_out_channels"][0]
    shape = f"{label}: UNet width {width}, {kwargs['layers_per_block']} res/level ({n / 1e6:.0f}M)"
    return {"params": {"unet": n}, "shape": shape, "image_size": kwargs["sample_size"]}
