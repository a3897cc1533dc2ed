"""What the embedded discrete prior caps: the VQ-VAE's own reconstruction of the evaluation images,
and (with --table) G2D2's fidelity on the observed pixels of inpaint_box.

1. Reconstruction (encode, nearest code, decode) of the four held-out evaluation images at the
   prior's size, loaded exactly as `data=embedded` loads them and the prior through the same
   `VQDiffusionPrior` as every run: PSNR, VGG LPIPS and the per-channel mean error (a colour cast
   shows up there) per image and on average.
2. `--table <tiny_table sweep folder>`: for each method of the inpaint_box cells, PSNR over the
   observed pixels only (outside the box), from the saved ground truth / reconstruction PNGs and
   the mask in operators/<index>.safetensors.

    python scripts/eval_tiny_vq.py                                        # the shipped tiny_vq
    python scripts/eval_tiny_vq.py --path /tmp/w/tiny_vq                  # a freshly trained one
    python scripts/eval_tiny_vq.py --table outputs/tables/tiny_table/<date>
Prints markdown tables; `--json <file>` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("eval_tiny_vq")


@torch.no_grad()
def reconstruction(path: str, lpips_net: str = "vgg") -> dict:
    """Per-image and mean PSNR, LPIPS and per-channel mean error (8-bit levels, recon - truth)."""
    from g2d2.data import EmbeddedImages
    from g2d2.experiment.metrics import LPIPS, psnr
    from g2d2.priors.discrete import VQDiffusionPrior

    prior = VQDiffusionPrior(path)
    data = EmbeddedImages(prior.image_size)
    names, images = zip(*(data[i] for i in range(len(data))), strict=True)
    x = torch.stack(images)  # (4, 3, H, W) in [-1, 1]
    tokens = prior.encode(x)
    x_rec = prior.decode_tokens(tokens)
    # the 8-bit round trip every saved PNG and metric sees
    x_rec = ((x_rec + 1) * 127.5).round() / 127.5 - 1
    p = psnr(x_rec, x)
    d = LPIPS(lpips_net)(x_rec, x)
    cast = ((x_rec - x) * 127.5).mean(dim=(2, 3))  # (4, 3)
    rows = [dict(image=n, psnr=round(p[i].item(), 2), lpips=round(d[i].item(), 3),
                 mean_error_rgb=[round(v, 1) for v in cast[i].tolist()]) for i, n in enumerate(names)]
    mean = dict(psnr=round(p.mean().item(), 2), lpips=round(d.mean().item(), 3),
                mean_error_rgb=[round(v, 1) for v in cast.mean(0).tolist()],
                mean_abs_error_rgb=[round(v, 1) for v in cast.abs().mean(0).tolist()])
    return dict(path=path, image_size=prior.image_size, token_shape=list(prior.token_shape),
                num_codes=prior.num_codes, codes_used=int(tokens.unique().numel()), lpips_net=lpips_net,
                images=rows, mean=mean)


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def observed_psnr(table: Path, task: str = "inpaint_box") -> dict[str, list[float]]:
    """{method: [PSNR over observed pixels per image]} for the `task` cells of a tiny_table sweep."""
    from safetensors.torch import load_file

    out: dict[str, list[float]] = {}
    for run in sorted(p for p in table.iterdir() if p.is_dir() and f"_{task}_" in p.name + "_"):
        method = run.name.split(f"_{task}_", 1)[1]
        values = []
        for recon in sorted((run / "images").glob("*_recon.png")):
            index = int(recon.name.split("_", 1)[0])
            mask = load_file(str(run / "operators" / f"{index:05d}.safetensors"))["mask"][0, 0].numpy() > 0.5
            gt = _png(recon.with_name(recon.name.replace("_recon.png", "_gt.png")))
            mse = ((_png(recon) - gt)[mask] ** 2).mean()
            values.append(round(10 * math.log10(1.0 / max(mse, 1e-12)), 2))
        if values:
            out[method] = values
    if not out:
        raise SystemExit(f"no {task} runs with images/ and operators/ under {table}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default="embedded:tiny_vq", help="prior.path of the discrete prior")
    parser.add_argument("--lpips-net", default="vgg", choices=("alex", "vgg"))
    parser.add_argument("--table", type=Path, default=None, help="a tiny_table sweep folder (inpaint_box cells)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = dict(reconstruction=reconstruction(args.path, args.lpips_net))
    rec = result["reconstruction"]
    lines = [f"VQ-VAE reconstruction of the evaluation images ({args.path}, {rec['image_size']} px, "
             f"{rec['token_shape'][0]} x {rec['token_shape'][1]} tokens, {rec['codes_used']} of "
             f"{rec['num_codes']} codes used)", "",
             f"| image | PSNR [dB] | LPIPS ({args.lpips_net}) | mean error R, G, B [8-bit levels] |",
             "|---|---|---|---|"]
    for r in rec["images"] + [dict(image="**mean**", **rec["mean"])]:
        lines.append(f"| {r['image']} | {r['psnr']:.2f} | {r['lpips']:.3f} | "
                     + ", ".join(f"{v:+.1f}" for v in r["mean_error_rgb"]) + " |")
    if args.table is not None:
        obs = observed_psnr(args.table)
        result["inpaint_box_observed_psnr"] = obs
        lines += ["", "inpaint_box: PSNR over the observed pixels (outside the box)", "",
                  "| method | per image [dB] | mean [dB] |", "|---|---|---|"]
        for method, values in obs.items():
            lines.append(f"| {method} | {', '.join(f'{v:.2f}' for v in values)} | {np.mean(values):.2f} |")
    print("\n".join(lines))  # noqa: T201 - the script's output
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return result

