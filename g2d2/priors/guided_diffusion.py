"""guided-diffusion (ADM) checkpoints -> diffusers `UNet2DModel`, by our own key conversion.

There is no official converter. A guided-diffusion `UNetModel` is a list of `input_blocks`, a
`middle_block` and a list of `output_blocks`, each a sequence of ResBlock / AttentionBlock /
(Down|Up)sample modules; `UNet2DModel` groups the same modules per resolution level. This module
holds (1) the architectures of the two checkpoints the DPS / RED-Diff papers use, (2) the
`UNet2DModel` config with the same computation, and (3) the key mapping, including the split of the
fused 1x1-conv `qkv` of the attention blocks. Verified against a reference forward pass of the
original layout in tests/test_guided_diffusion.py.

Facts used (guided-diffusion `unet.py` / `script_util.py`; DPS `configs/*model_config.yaml`):
    - ResBlock: in_layers = [GroupNorm(32), SiLU, conv3x3], emb_layers = [SiLU, Linear(4C_model ->
      C or 2C)], out_layers = [GroupNorm(32), SiLU, Dropout, conv3x3], skip_connection = 1x1 conv
      when channels change; with use_scale_shift_norm: h = norm(h) * (1 + scale) + shift;
      resblock_updown: nearest x2 / avg-pool /2 after in_layers[:-1] on both paths (as diffusers'
      ResnetBlock2D(up|down=True)).
    - AttentionBlock: norm, qkv = Conv1d(C, 3C, 1), proj_out = Conv1d(C, C, 1); the legacy order
      (QKVAttentionLegacy, both public checkpoints) lays qkv out as [head][q, k, v][head_channels];
      the new order (QKVAttention) as [q, k, v][head][head_channels]. Heads = C // num_head_channels.
    - Timestep embedding: [cos, sin] of t * 10000^(-i/half) -> Linear, SiLU, Linear.
    - learn_sigma: 6 output channels, eps then the variance interpolation value v in [-1, 1].
    - ffhq_10m.pt (DPS): 128 channels, mult (1, 1, 2, 2, 4, 4), 1 res block, attention at 16 px,
      64 head channels, scale-shift norm, resblock up/down, learned sigma, legacy attention.
    - 256x256_diffusion_uncond.pt (ADM ImageNet): 256 channels, same mult, 2 res blocks, attention
      at 32/16/8 px, 64 head channels, scale-shift norm, resblock up/down, learned sigma.
    - Both: linear betas 1e-4 .. 0.02, T = 1000.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import UNet2DModel

from g2d2.priors.checkpoints import CheckpointError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ADMConfig:
    """Architecture of a guided-diffusion `UNetModel` (unconditional, 2-D).

    Attributes:
        model_channels: base width (`num_channels` in guided-diffusion flags).
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        channel_mult: width multiplier per level; channel_mult[0] must be 1.
        attention_ds: downsampling factors (image_size // resolution) with attention blocks.
        num_head_channels: channels per attention head.
        learn_sigma: the network also outputs the learned-range variance value (6 output channels).
        resblock_updown: down/upsample with ResBlocks (else strided conv / nearest + conv).
        use_scale_shift_norm: the time embedding scales and shifts the second GroupNorm.
        use_new_attention_order: qkv laid out as [q, k, v][head] (else the legacy [head][q, k, v]).
        in_channels: image channels.
        image_size: training resolution.
    """

    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_ds: tuple[int, ...]
    num_head_channels: int = 64
    learn_sigma: bool = True
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    use_new_attention_order: bool = False
    in_channels: int = 3
    image_size: int = 256

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def has_attention(self, level: int) -> bool:
        return 2**level in self.attention_ds


def ffhq_10m_config(model_channels: int = 128) -> ADMConfig:
    """DPS's FFHQ 256 checkpoint `ffhq_10m.pt`; `model_channels` < 128 gives the same shape, narrower."""
    return ADMConfig(model_channels, 1, (1, 1, 2, 2, 4, 4), attention_ds=(16,))


def imagenet256_uncond_config(model_channels: int = 256) -> ADMConfig:
    """ADM's unconditional ImageNet 256 checkpoint `256x256_diffusion_uncond.pt` (attention at 32/16/8 px)."""
    return ADMConfig(model_channels, 2, (1, 1, 2, 2, 4, 4), attention_ds=(8, 16, 32))


#: the architectures `load_adm_unet` recognises, by name (width inferred from the checkpoint)
KNOWN_ARCHITECTURES = {"ffhq_10m": ffhq_10m_config, "imagenet256_uncond": imagenet256_uncond_config}


def unet2d_config(cfg: ADMConfig) -> dict:
    """Keyword arguments of the `UNet2DModel` that computes the same function as `cfg`'s UNetModel."""
    if cfg.channel_mult[0] != 1:
        raise ValueError(f"channel_mult must start with 1 (got {cfg.channel_mult}) to map onto UNet2DModel")
    attn_channels = [cfg.model_channels * m for i, m in enumerate(cfg.channel_mult) if cfg.has_attention(i)]
    for c in attn_channels + [cfg.model_channels * cfg.channel_mult[-1]]:
        if c % cfg.num_head_channels:
            raise ValueError(f"{c} attention channels are not a multiple of num_head_channels={cfg.num_head_channels}")
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if cfg.resblock_updown else (
        "DownBlock2D",
        "UpBlock2D",
    )
    levels = range(len(cfg.channel_mult))
    resample = "resnet" if cfg.resblock_updown else "conv"
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        time_embedding_type="positional",
        flip_sin_to_cos=True,  # [cos, sin] as guided-diffusion
        freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if cfg.has_attention(i) else plain_down for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if cfg.has_attention(i) else plain_up for i in reversed(levels)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type=resample,
        upsample_type=resample,
        dropout=0.0,
        act_fn="silu",
        attention_head_dim=cfg.num_head_channels,
        norm_num_groups=32,
        attn_norm_num_groups=32,  # the mid attention keeps its GroupNorm with scale-shift resnets
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
    )


def adm_ffhq_unet_config() -> dict:
    """`UNet2DModel(**adm_ffhq_unet_config())` has the shape of DPS's `ffhq_10m.pt` (for benchmarks)."""
    return unet2d_config(ffhq_10m_config())


def adm_imagenet_unet_config() -> dict:
    """`UNet2DModel(**adm_imagenet_unet_config())` has the shape of ADM's ImageNet 256 uncond model."""
    return unet2d_config(imagenet256_uncond_config())


_RESBLOCK_KEYS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _module_map(cfg: ADMConfig) -> list[tuple[str, str, str]]:
    """(guided-diffusion module prefix, UNet2DModel module prefix, kind) for every module with weights."""
    m = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain")]
    m.append(("input_blocks.0.0", "conv_in", "plain"))
    last = len(cfg.channel_mult) - 1
    k = 1
    for level in range(last + 1):
        for j in range(cfg.num_res_blocks):
            m.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "resblock"))
            if cfg.has_attention(level):
                m.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            k += 1
        if level != last:
            if cfg.resblock_updown:
                m.append((f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", "resblock"))
            else:
                m.append((f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            k += 1
    m += [
        ("middle_block.0", "mid_block.resnets.0", "resblock"),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", "resblock"),
    ]
    k = 0
    for i, level in enumerate(reversed(range(last + 1))):
        for j in range(cfg.num_res_blocks + 1):
            m.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resblock"))
            sub = 1
            if cfg.has_attention(level):
                m.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
                sub = 2
            if level != 0 and j == cfg.num_res_blocks:
                if cfg.resblock_updown:
                    m.append((f"output_blocks.{k}.{sub}", f"up_blocks.{i}.upsamplers.0", "resblock"))
                else:
                    m.append((f"output_blocks.{k}.{sub}.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
            k += 1
    m += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return m


def _split_qkv(w: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused (3C, ...) qkv weight or bias -> (C, ...) q, k, v in diffusers' head-major layout."""
    c = w.shape[0] // 3
    rest = w.shape[1:]
    if new_order:  # [q, k, v][head][ch]
        parts = w.reshape(3, c, *rest)
        return parts[0], parts[1], parts[2]
    per_head = w.reshape(heads, 3, c // heads, *rest)  # [head][q, k, v][ch]
    return tuple(per_head[:, i].reshape(c, *rest) for i in range(3))  # type: ignore[return-value]


def convert_state_dict(state: dict[str, torch.Tensor], cfg: ADMConfig) -> dict[str, torch.Tensor]:
    """Rename and reshape a guided-diffusion state dict into `UNet2DModel(**unet2d_config(cfg))` keys.

    Raises:
        CheckpointError: when a key of `state` is not used by `cfg`'s layout, or one it needs is missing.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"key '{key}' is missing from the guided-diffusion state dict")
        used.add(key)
        return state[key]

    for src, dst, kind in _module_map(cfg):
        if kind == "plain":
            for p in ("weight", "bias"):
                out[f"{dst}.{p}"] = take(f"{src}.{p}")
        elif kind == "resblock":
            for a, b in _RESBLOCK_KEYS.items():
                if a == "skip_connection" and f"{src}.{a}.weight" not in state:
                    continue  # identity skip: same channels in and out
                for p in ("weight", "bias"):
                    out[f"{dst}.{b}.{p}"] = take(f"{src}.{a}.{p}")
        else:  # attention
            for p in ("weight", "bias"):
                out[f"{dst}.group_norm.{p}"] = take(f"{src}.norm.{p}")
                qkv = take(f"{src}.qkv.{p}")
                heads = qkv.shape[0] // 3 // cfg.num_head_channels
                q, k, v = _split_qkv(qkv, heads, cfg.use_new_attention_order)
                proj = take(f"{src}.proj_out.{p}")
                if p == "weight":  # Conv1d (C_out, C_in, 1) -> Linear (C_out, C_in)
                    q, k, v, proj = q[..., 0], k[..., 0], v[..., 0], proj[..., 0]
                out[f"{dst}.to_q.{p}"], out[f"{dst}.to_k.{p}"], out[f"{dst}.to_v.{p}"] = q, k, v
                out[f"{dst}.to_out.0.{p}"] = proj
    unused = sorted(set(state) - used)
    if unused:
        raise CheckpointError(
            f"{len(unused)} keys of the guided-diffusion state dict do not belong to the expected "
            f"architecture (e.g. {unused[:5]})"
        )
    return {k: v.contiguous() for k, v in out.items()}


def _infer_width(state: dict[str, torch.Tensor]) -> int:
    w = state.get("input_blocks.0.0.weight")
    if not isinstance(w, torch.Tensor) or w.ndim != 4:
        raise CheckpointError("not a guided-diffusion UNetModel state dict: no 'input_blocks.0.0.weight' conv")
    return int(w.shape[0])


def build_unet(cfg: ADMConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> UNet2DModel:
    """UNet2DModel (parameters in `dtype`) for `cfg` with the converted guided-diffusion `state` loaded strictly.

    Raises:
        CheckpointError: on any missing, unexpected or mis-shaped key (never a partly random model).
    """
    converted = convert_state_dict(state, cfg)
    unet = UNet2DModel(**unet2d_config(cfg))
    if dtype != torch.float32:
        unet = unet.to(dtype)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = [k for k in expected if k in converted and expected[k].shape != converted[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"converted state dict does not fit the UNet2DModel: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {shapes[:5]}"
        )
    unet.load_state_dict({k: v.to(expected[k].dtype) for k, v in converted.items()}, strict=True)
    return unet


def load_adm_unet(path: str | Path) -> tuple[UNet2DModel, ADMConfig]:
    """Load a guided-diffusion `.pt` state dict (torch.load weights_only=True) as a UNet2DModel.

    The architecture is recognised among `KNOWN_ARCHITECTURES` (its width read from the checkpoint).

    Raises:
        CheckpointError: naming the path when the file cannot be read or matches no known architecture.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with guidance
        raise CheckpointError(
            f"cannot read '{path}' as a guided-diffusion checkpoint (a torch state dict saved with "
            f"torch.save, loadable with weights_only=True): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' does not hold a plain state dict (name -> tensor) of a guided-diffusion UNet")
    width = _infer_width(state)
    errors = []
    for name, make in KNOWN_ARCHITECTURES.items():
        cfg = make(model_channels=width)
        cfg = replace(cfg, learn_sigma=state.get("out.2.weight", torch.empty(0)).shape[:1] == (2 * cfg.in_channels,))
        try:
            unet = build_unet(cfg, state)
        except (CheckpointError, ValueError) as err:
            errors.append(f"{name}: {err}")
            continue
        logger.info("loaded %s as guided-diffusion '%s' (width %d, learn_sigma=%s)", path, name, width, cfg.learn_sigma)
        return unet, cfg
    raise CheckpointError(
        f"'{path}' matches none of the known guided-diffusion architectures "
        f"({', '.join(KNOWN_ARCHITECTURES)}); expected DPS's ffhq_10m.pt or ADM's "
        "256x256_diffusion_uncond.pt layout. Details: " + " | ".join(errors)
    )
