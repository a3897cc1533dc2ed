"""Image quality metrics: PSNR, SSIM and LPIPS, per image.

All functions take images as (B, 3, H, W) tensors in [-1, 1] (the range every prior, operator and
solver in g2d2 uses) and return one value per image, a (B,) tensor.

PSNR and SSIM come from torchmetrics' functional API, on images clamped to [-1, 1] and mapped to
[0, 1] (data_range 1.0). LPIPS wraps the `lpips` package (v0.1 linear layers) with a real ImageNet
AlexNet / VGG16 trunk. The trunk weights are read from the torch hub checkpoint cache
(`torch.hub.get_dir()/checkpoints/<torchvision file name>`); nothing is ever downloaded. When the
file is missing, `LPIPS` refuses to run (a random trunk would give meaningless numbers) and names the
command that installs the weights offline:

    python scripts/install_lpips_weights.py

References:
    Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018.
    Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity", TIP 2004.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from torch import nn

from g2d2.errors import UserError

logger = logging.getLogger(__name__)

#: the command that writes the backbone weights into the torch hub cache (run from the repo root)
LPIPS_INSTALL_COMMAND = "python scripts/install_lpips_weights.py"

LPIPSNet = Literal["alex", "vgg"]
LPIPS_NETS: tuple[str, ...] = ("alex", "vgg")


class LPIPSWeightsMissingError(UserError, FileNotFoundError):
    """The ImageNet backbone weights LPIPS needs are not in the torch hub checkpoint cache."""


def _check_images(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    if x_hat.shape != x.shape or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"metrics expect two (B, 3, H, W) images of the same shape, got {tuple(x_hat.shape)} "
            f"and {tuple(x.shape)}"
        )


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] after clamping; float64 stays float64, anything else becomes float32."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.detach().to(dtype).clamp(-1.0, 1.0) + 1.0) / 2.0


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(1 / mse) on [0, 1].

    Args:
        x_hat: (B, 3, H, W) reconstruction in [-1, 1].
        x: (B, 3, H, W) reference in [-1, 1].
    Returns:
        (B,) PSNR per image (inf where the images are equal).
    """
    _check_images(x_hat, x)
    import torchmetrics.functional.image as tmf  # here: its import takes seconds a failing run does not need

    return tmf.peak_signal_noise_ratio(
        _to_unit(x_hat), _to_unit(x), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Gaussian window 11, sigma 1.5) on [0, 1].

    Args:
        x_hat: (B, 3, H, W) reconstruction in [-1, 1].
        x: (B, 3, H, W) reference in [-1, 1].
    Returns:
        (B,) SSIM per image (1 where the images are equal).
    """
    _check_images(x_hat, x)
    import torchmetrics.functional.image as tmf

    return tmf.structural_similarity_index_measure(
        _to_unit(x_hat), _to_unit(x), data_range=1.0, reduction="none"
    )


def backbone_weights_path(net: str) -> Path:
    """Where torchvision caches the ImageNet weights of LPIPS' trunk `net` ("alex" or "vgg").

    The file name is the one in torchvision's weight enum (e.g. alexnet-owt-7be5be79.pth); the
    folder is `torch.hub.get_dir()/checkpoints`, read at call time.
    """
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    enums = {"alex": AlexNet_Weights.IMAGENET1K_V1, "vgg": VGG16_Weights.IMAGENET1K_V1}
    if net not in enums:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {LPIPS_NETS}")
    file_name = os.path.basename(urlparse(enums[net].url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _require_backbone_weights(net: str) -> Path:
    path = backbone_weights_path(net)
    if not path.is_file():
        raise LPIPSWeightsMissingError(
            f"LPIPS ({net}) needs the ImageNet backbone weights at {path}, which is missing; refusing "
            f"to run with a random trunk. Install them offline (from the repository root) with:\n"
            f"    {LPIPS_INSTALL_COMMAND}\n"
            f"(add `--nets {net}` for this net only; TORCH_HOME changes the cache folder)"
        )
    return path


def _load_trunk(trunk: nn.Module, path: Path) -> None:
    """Copy torchvision `features.<i>.*` tensors from `path` into lpips' trunk slices.

    lpips keeps torchvision's feature indices as child names inside its slices
    (`slice2.3` is `features.3`), so the keys map one to one. Every trunk parameter must be found.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    n_loaded = 0
    for slice_ in trunk.children():
        for index, module in slice_.named_children():
            for name, param in module.named_parameters(recurse=False):
                key = f"features.{index}.{name}"
                if key not in state or state[key].shape != param.shape:
                    got = tuple(state[key].shape) if key in state else "missing"
                    raise RuntimeError(
                        f"{path} does not hold {key} of shape {tuple(param.shape)} (got {got}); "
                        f"reinstall the weights with `{LPIPS_INSTALL_COMMAND} --force`"
                    )
                if not torch.isfinite(state[key]).all():
                    raise RuntimeError(f"{path}: {key} holds NaN/Inf; reinstall with --force")
                with torch.no_grad():
                    param.copy_(state[key])
                n_loaded += 1
    if n_loaded == 0:
        raise RuntimeError(f"found no trunk parameters to load from {path}; is lpips' layout unchanged?")


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with a real ImageNet trunk, per image. Build once per run.

    Usage:
        lpips_metric = LPIPS("alex").to(device)
        d = lpips_metric(x_hat, x)   # (B,)

    Args:
        net: trunk, "alex" (the default, as in most inverse-problem papers) or "vgg".
    Raises:
        LPIPSWeightsMissingError: the trunk weights are not installed (message gives the command).
    """

    def __init__(self, net: LPIPSNet = "alex") -> None:
        super().__init__()
        import lpips

        path = _require_backbone_weights(net)
        # pnet_rand=True: lpips builds its trunk without torchvision weights, so it can never try a
        # download; we then fill the trunk from the checked file. pretrained=True loads lpips'
        # shipped v0.1 linear layers. verbose=False silences its prints; torchvision warns about
        # the deprecated `pretrained` argument lpips passes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        _load_trunk(model.net, path)
        model.eval().requires_grad_(False)
        self.net_name = net
        self.model = model
        logger.info("LPIPS(%s) trunk loaded from %s", net, path)

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode (lpips' linear layers hold dropout): a metric never trains."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image.

        Args:
            x_hat: (B, 3, H, W) reconstruction in [-1, 1] (clamped), on this module's device.
            x: (B, 3, H, W) reference in [-1, 1] (clamped).
        Returns:
            (B,) float32 distances (0 for equal images, larger is more different).
        """
        _check_images(x_hat, x)
        a = x_hat.detach().float().clamp(-1.0, 1.0)
        b = x.detach().float().clamp(-1.0, 1.0)
        return self.model(a, b).reshape(x.shape[0])
