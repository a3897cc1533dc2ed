"""Train the tiny embedded priors on offline data (dead leaves + bundled photos), on a time budget.

Stages (each writes fp16 safetensors in diffusers layout plus a training_report.json):
  vq           VQModel, 64 px -> 32 x 32 tokens            -> <out>/tiny_vq/vqvae/
  transformer  discrete Transformer2DModel (VQ-Diffusion)  -> <out>/tiny_vq/transformer/, scheduler/
               (needs the trained vqvae)
  ddpm         UNet2DModel eps-prediction DDPM, EMA        -> <out>/tiny_ddpm/unet/, scheduler/
`--stage all` = vq,transformer,ddpm; a comma list runs stages in order. ddpm is independent, so it
can run in a second process on the same GPU.

Each stage trains for its wall-clock budget (`--minutes-*`: the total over resumes, not counting
setup and export); the learning rate follows the fraction of the budget used. Full training state
goes to <work-dir>/<stage>/state.pt every `--save-every-s` and at the end; `--resume` continues
from there. Held-out metrics use crops of the evaluation images (never trained on, see
g2d2/train/trainset.py).

Example (CPU smoke test):  python scripts/train_tiny_priors.py --stage all --tiny --device cpu \
    --minutes-vq 0.05 --minutes-transformer 0.05 --minutes-ddpm 0.05 --out /tmp/w --work-dir /tmp/wd
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from g2d2.train.loop import STAGES
from g2d2.train.stages import DDPMStage, TransformerStage, VQStage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="all", help="vq | transformer | ddpm | all, or a comma list (run in order)")
    p.add_argument("--minutes-vq", type=float, default=2.5, help="training wall-clock budget of the vq stage")
    p.add_argument("--minutes-transformer", type=float, default=2.0)
    p.add_argument("--minutes-ddpm", type=float, default=4.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="g2d2/priors/weights", help="weights root (tiny_vq/, tiny_ddpm/ go here)")
    p.add_argument("--work-dir", default="outputs/train_tiny_priors", help="resumable training states")
    p.add_argument("--resume", action="store_true", help="continue from <work-dir>/<stage>/state.pt if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every stage (overrides below)")
    p.add_argument("--batch-vq", type=int, default=128)
    p.add_argument("--batch-transformer", type=int, default=256)
    p.add_argument("--batch-ddpm", type=int, default=128)
    p.add_argument("--crop-vq", type=int, default=32, help="side of the training crops of the vq stage (px)")
    p.add_argument("--vq-continue", action="store_true",
                   help="vq stage: start from <out>/tiny_vq/vqvae (codebook kept) instead of a random VQ-VAE")
    p.add_argument("--vq-permute-channels", action="store_true",
                   help="vq stage: random RGB channel order per training image (colours the photos lack)")
    p.add_argument("--vq-decoder-only", action="store_true",
                   help="vq stage: continue the decoder of <out>/tiny_vq/vqvae with encoder and codebook frozen "
                        "(tokens unchanged, so a transformer trained on them stays valid)")
    p.add_argument("--transformer-continue", action="store_true",
                   help="transformer stage: start from <out>/tiny_vq/transformer instead of a random one "
                        "(valid only while the VQ-VAE's tokens are unchanged)")
    p.add_argument("--lr-vq", type=float, default=1e-3)
    p.add_argument("--lr-transformer", type=float, default=8e-4)
    p.add_argument("--lr-ddpm", type=float, default=4e-4)
    p.add_argument("--ema-decay", type=float, default=0.9995, help="EMA decay of the DDPM weights")
    p.add_argument("--dead-leaves-fraction", type=float, default=0.5, help="share of dead-leaves images")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for the convnets")
    p.add_argument("--tiny", action="store_true", help="tiny models and eval sets, for smoke tests")
    p.add_argument("--log-every-s", type=float, default=15.0)
    p.add_argument("--eval-every-s", type=float, default=60.0)
    p.add_argument("--save-every-s", type=float, default=60.0)
    p.add_argument("--num-eval", type=int, default=512, help="held-out crops for the metrics")
    args = p.parse_args(argv)
    stages = STAGES if args.stage == "all" else tuple(s.strip() for s in args.stage.split(","))
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {STAGES} or 'all'")
    args.stages = stages
    if args.batch_size is not None:
        args.batch_vq = args.batch_transformer = args.batch_ddpm = args.batch_size
    if args.tiny:  # smoke-test sizes unless given explicitly
        args.num_eval = min(args.num_eval, 16)
        for name in STAGES:
            if f"--batch-{name}" not in (argv or sys.argv) and args.batch_size is None:
                setattr(args, f"batch_{name}", 8)
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    classes = dict(vq=VQStage, transformer=TransformerStage, ddpm=DDPMStage)
    reports = {}
    for name in args.stages:
        torch.manual_seed(args.seed)
        reports[name] = classes[name](args, device).run()
    return reports
