"""guided-diffusion -> UNet2DModel conversion, checked against a reference forward pass of the original layout.

`GDUNet` below is our own minimal re-implementation of guided-diffusion's UNetModel computation
(module names and parameter layout as in its checkpoints: input_blocks / middle_block /
output_blocks, ResBlock in_layers / emb_layers / out_layers / skip_connection, AttentionBlock
norm / qkv / proj_out). It is written from the architecture description, independently of the key
mapping in g2d2.priors.guided_diffusion, so a wrong mapping shows as a different output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from g2d2.noise.ddpm import ddpm_chain, linear_betas
from g2d2.priors.checkpoints import CheckpointError
from g2d2.priors.guided_diffusion import (
    ADMConfig,
    adm_ffhq_unet_config,
    adm_imagenet_unet_config,
    build_unet,
    convert_state_dict,
    ffhq_10m_config,
    imagenet256_uncond_config,
    load_adm_unet,
)
from g2d2.priors.pixel import DDPMPrior

pytestmark = pytest.mark.usefixtures("one_thread")


class GDResBlock(nn.Module):
    def __init__(self, ch: int, emb: int, out: int, scale_shift: bool, up: bool = False, down: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out if scale_shift else out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == ch else nn.Conv2d(ch, out, 1)
        self.scale_shift, self.up, self.down = scale_shift, up, down

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[:-1](x)
        if self.up:
            h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.in_layers[-1](h)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class GDAttention(nn.Module):
    def __init__(self, ch: int, head_channels: int, new_order: bool):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)
        self.heads, self.new_order = ch // head_channels, new_order

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        f = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(f))  # (B, 3C, L)
        d = c // self.heads
        if self.new_order:  # [q, k, v][head][ch]
            q, k, v = (z.reshape(b * self.heads, d, -1) for z in qkv.chunk(3, dim=1))
        else:  # legacy: [head][q, k, v][ch]
            q, k, v = qkv.reshape(b * self.heads, 3 * d, -1).split(d, dim=1)
        s = d**-0.25
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (f + self.proj_out(a)).reshape(b, c, hh, ww)


class GDDown(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.op(x)


class GDUp(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Seq(nn.ModuleList):
    def forward(self, x, emb):
        for m in self:
            x = m(x, emb)
        return x


class GDUNet(nn.Module):
    """Our reference of guided-diffusion's UNetModel (unconditional), built the way it builds itself."""

    def __init__(self, cfg: ADMConfig):
        super().__init__()
        mc, emb, ss = cfg.model_channels, 4 * cfg.model_channels, cfg.use_scale_shift_norm
        self.mc = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        attn = lambda c: GDAttention(c, cfg.num_head_channels, cfg.use_new_attention_order)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [GDResBlock(ch, emb, mult * mc, ss)]
                ch = mult * mc
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(Seq(layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = GDResBlock(ch, emb, ch, ss, down=True) if cfg.resblock_updown else GDDown(ch)
                self.input_blocks.append(Seq([down]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Seq([GDResBlock(ch, emb, ch, ss), attn(ch), GDResBlock(ch, emb, ch, ss)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [GDResBlock(ch + chans.pop(), emb, mult * mc, ss)]
                ch = mult * mc
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(GDResBlock(ch, emb, ch, ss, up=True) if cfg.resblock_updown else GDUp(ch))
                    ds //= 2
                self.output_blocks.append(Seq(layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.mc // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype))
        hs, h = [], x
        for k, block in enumerate(self.input_blocks):
            h = block[0](h) if k == 0 else block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def random_gd_model(cfg: ADMConfig, seed: int = 0) -> GDUNet:
    """GDUNet in float64 with every parameter random (norm affines too, no zero-initialised layers)."""
    torch.manual_seed(seed)
    model = GDUNet(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif "norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


TINY = {
    # the two public architectures at a tiny width (32 base channels; 64 head channels as published)
    "ffhq_10m": ffhq_10m_config(model_channels=32),
    "imagenet256_uncond": imagenet256_uncond_config(model_channels=32),
    # the other options of the mapping: conv resampling, additive time embedding, new qkv order
    "plain": ADMConfig(32, 1, (1, 2, 2), attention_ds=(2,), num_head_channels=32, learn_sigma=False,
                       resblock_updown=False, use_scale_shift_norm=False, use_new_attention_order=True),
}


@pytest.mark.parametrize("name", list(TINY))
def test_conversion_matches_reference_forward(name: str) -> None:
    cfg = TINY[name]
    gd = random_gd_model(cfg)
    unet = build_unet(cfg, gd.state_dict(), dtype=torch.float64).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([7, 901])
    with torch.no_grad():
        ref, out = gd(x, t), unet(x, t).sample
    assert out.shape == (2, cfg.out_channels, 32, 32)
    assert ref.abs().mean() > 0.1  # a non-trivial function of the input
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)  # float64 throughout: exact up to rounding


@pytest.mark.parametrize("name", ["ffhq_10m", "imagenet256_uncond"])
def test_pt_checkpoint_loads_through_prior(name: str, tmp_path) -> None:
    cfg = TINY[name]
    gd = random_gd_model(cfg).float()
    path = tmp_path / f"{name}.pt"
    torch.save(gd.state_dict(), path)
    prior = DDPMPrior(str(path))
    assert prior.learned_variance and prior.num_train_timesteps == 1000 and prior.image_size == 256
    assert not any(p.requires_grad for p in prior.parameters())
    torch.testing.assert_close(prior.alphas_cumprod, torch.cumprod(1 - linear_betas(), 0))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3, 500])
    eps, log_var = prior.predict(x, t)
    with torch.no_grad():
        ref = gd(x, t)
    torch.testing.assert_close(eps, ref[:, :3], rtol=0, atol=1e-4)
    chain = ddpm_chain(prior.alphas_cumprod)
    frac = (ref[:, 3:].double() + 1) / 2
    lo, hi = chain.posterior_log_variance_clipped[t].view(-1, 1, 1, 1), chain.betas[t].log().view(-1, 1, 1, 1)
    torch.testing.assert_close(log_var.double(), frac * hi + (1 - frac) * lo, rtol=0, atol=1e-4)
    _, cfg_found = load_adm_unet(path)
    assert cfg_found == cfg


def test_unknown_architecture_and_bad_keys_are_refused(tmp_path) -> None:
    state = random_gd_model(TINY["ffhq_10m"]).float().state_dict()
    for label, bad in [
        ("missing", {k: v for k, v in state.items() if k != "middle_block.1.qkv.weight"}),
        ("unexpected", {**state, "label_emb.weight": torch.zeros(10, 128)}),
        ("plain", random_gd_model(TINY["plain"]).float().state_dict()),
    ]:
        path = tmp_path / f"{label}.pt"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match="matches none of the known") as err:
            DDPMPrior(str(path))
        assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="missing"):
        build_unet(TINY["ffhq_10m"], {k: v for k, v in state.items() if k != "out.2.bias"})
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        DDPMPrior(str(tmp_path / "garbage.pt"))


@pytest.mark.parametrize("make", [ffhq_10m_config, imagenet256_uncond_config])
def test_full_size_mapping(make) -> None:
    """At full width (on the meta device), every converted key and shape fits the benchmark's UNet2DModel."""
    from diffusers import UNet2DModel

    cfg = make()
    unet_cfg = adm_ffhq_unet_config() if make is ffhq_10m_config else adm_imagenet_unet_config()
    with torch.device("meta"):
        gd_state = GDUNet(cfg).state_dict()
        expected = UNet2DModel(**unet_cfg).state_dict()
    converted = convert_state_dict(gd_state, cfg)
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    n_params = sum(v.numel() for v in gd_state.values())
    assert n_params == sum(v.numel() for v in expected.values())
    # published sizes: ffhq_10m about 94 M parameters, ImageNet 256 uncond about 554 M
    assert (90e6 < n_params < 100e6) if make is ffhq_10m_config else (540e6 < n_params < 570e6), n_params
