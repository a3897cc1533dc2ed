"""Unconditional samples from the tiny priors, saved as PNG grids (for the README).

  VQ:   VQ-Diffusion reverse process (diffusers VQDiffusionScheduler.step) from all-mask tokens,
        the transformer's log p(z_0 | z_t) at each of the T = 100 steps, then the VQ decoder.
  DDPM: ancestral DDPM sampling (diffusers DDPMScheduler.step) from Gaussian noise.

Example: python scripts/sample_priors.py --device cpu --num 16 --seed 0
  -> docs/samples_tiny_vq.png, docs/samples_tiny_ddpm.png
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from g2d2.data import to_uint8

logger = logging.getLogger("sample_priors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default="g2d2/priors/weights", help="folder holding tiny_vq/ and tiny_ddpm/")
    p.add_argument("--which", default="vq,ddpm", help="comma list of vq, ddpm")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num", type=int, default=16, help="samples per prior")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="docs", help="where samples_tiny_<prior>.png go")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="DDPM sampling steps (<= 1000, evenly spaced)")
    p.add_argument("--truncation", type=float, default=1.0,
                   help="VQ: keep the most likely codes up to this cumulative probability (1 = no truncation)")
    p.add_argument("--zoom", type=int, default=2, help="nearest-neighbour upscaling of the grid")
    return p.parse_args(argv)


def save_grid(images: torch.Tensor, path: Path, zoom: int = 1) -> None:
    """(B, 3, H, W) in [-1, 1] -> one PNG grid with ceil(sqrt(B)) columns and 2 px gaps."""
    x = to_uint8(images)
    b, h, w, _ = x.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = x[i]
    img = Image.fromarray(grid)
    if zoom > 1:
        img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def truncate(log_p: torch.Tensor, rate: float) -> torch.Tensor:
    """Keep, per token, the most likely codes whose cumulative probability stays below `rate`
    (always the top one); the rest get log-probability -inf. log_p: (B, K, N)."""
    sorted_lp, order = log_p.sort(dim=1, descending=True)
    keep = sorted_lp.exp().cumsum(1) < rate
    keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], 1)
    keep = keep.gather(1, order.argsort(1))
    return log_p.masked_fill(~keep, -torch.inf)


@torch.no_grad()
def sample_vq(root: Path, num: int, device: torch.device, generator: torch.Generator,
              truncation: float = 1.0) -> torch.Tensor:
    from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel

    kw = dict(torch_dtype=torch.float32, low_cpu_mem_usage=False)
    vq = VQModel.from_pretrained(root / "vqvae", **kw).to(device).eval()
    transformer = Transformer2DModel.from_pretrained(root / "transformer", **kw).to(device).eval()
    scheduler = VQDiffusionScheduler.from_pretrained(root / "scheduler")
    k = vq.config.num_vq_embeddings
    side = transformer.config.sample_size
    scheduler.set_timesteps(scheduler.config.num_train_timesteps, device=device)
    tokens = torch.full((num, side * side), k, dtype=torch.long, device=device)  # all mask
    for t in scheduler.timesteps:
        log_p_x0 = transformer(tokens, timestep=t).sample  # (B, K, N)
        if truncation < 1.0:
            log_p_x0 = truncate(log_p_x0, truncation)
        log_p_x0 = log_p_x0.clamp(-70)
        tokens = scheduler.step(log_p_x0, timestep=t, sample=tokens, generator=generator).prev_sample
    emb = vq.quantize.get_codebook_entry(tokens, shape=(num, side, side, vq.config.vq_embed_dim))
    return vq.decode(emb, force_not_quantize=True).sample.clamp(-1, 1)


@torch.no_grad()
def sample_ddpm(root: Path, num: int, device: torch.device, generator: torch.Generator,
                steps: int = 1000) -> torch.Tensor:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(root / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False)
    unet = unet.to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
    scheduler.set_timesteps(steps, device=device)
    size = unet.config.sample_size
    x = torch.randn((num, 3, size, size), generator=generator, device=device)
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    weights, out_dir = Path(args.weights), Path(args.out_dir)
    written = {}
    for which in [w.strip() for w in args.which.split(",") if w.strip()]:
        if which not in ("vq", "ddpm"):
            raise ValueError(f"unknown prior '{which}' in --which; choose from vq, ddpm")
        root = weights / f"tiny_{which}"
        if not root.is_dir():
            raise FileNotFoundError(f"no trained prior at {root}: run scripts/train_tiny_priors.py first")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        t0 = time.time()
        if which == "vq":
            images = sample_vq(root, args.num, device, generator, args.truncation)
        else:
            images = sample_ddpm(root, args.num, device, generator, args.ddpm_steps)
        path = out_dir / f"samples_tiny_{which}.png"
        save_grid(images, path, args.zoom)
        written[which] = path
        logger.info("%s: %d samples in %.1f s -> %s", which, args.num, time.time() - t0, path)
    return written
