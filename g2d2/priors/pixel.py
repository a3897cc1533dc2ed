"""Pixel-space DDPM / ADM priors (for RED-Diff and DPS): a diffusers `UNet2DModel` + its DDPM schedule.

Checkpoint layouts `DDPMPrior` loads (all strictly: a missing or unexpected weight is an error,
never a partly random network):
    1. a diffusers folder with `unet/` (config.json + diffusion_pytorch_model.safetensors|.bin) and
       `scheduler/scheduler_config.json` (what UNet2DModel / DDPMScheduler.save_pretrained write;
       our embedded tiny prior);
    2. a diffusers DDPM repo with config.json, the weights and scheduler_config.json at its root
       (e.g. google/ddpm-celebahq-256), given as a folder or a Hugging Face id in the local cache;
    3. a guided-diffusion `.pt`/`.pth` state dict (DPS's ffhq_10m.pt, ADM's
       256x256_diffusion_uncond.pt), converted by g2d2.priors.guided_diffusion; linear betas
       1e-4 .. 0.02, T = 1000, learned-range variance.

Learned-range variance (Nichol & Dhariwal 2021, eq. 15): the network's extra output v in [-1, 1]
interpolates the log-variance of p(x_{t-1} | x_t) between log beta_t and the clipped log of the
posterior variance beta_tilde_t: log_var = frac log beta_t + (1 - frac) log beta_tilde_t,
frac = (v + 1) / 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from g2d2.noise.ddpm import ddpm_chain, linear_betas
from g2d2.priors.base import PixelPrior, enable_checkpointing, freeze, network_autocast, per_device, precision_dtype
from g2d2.priors.checkpoints import CheckpointError, resolve_checkpoint
from g2d2.priors.guided_diffusion import load_adm_unet

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: DDPMScheduler variance types we sample correctly: absent / fixed_small / fixed_small_log (the posterior
#: variance beta_tilde_t, the DPS solver's fixed variance) and learned_range (the network's extra channels)
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "learned_range")
_LAYOUTS = (
    "expected one of: a diffusers folder with unet/config.json + unet/diffusion_pytorch_model.safetensors "
    "(or .bin) and scheduler/scheduler_config.json; a diffusers DDPM repo with config.json, the weights and "
    "scheduler_config.json at its root (e.g. google/ddpm-celebahq-256); or a guided-diffusion .pt/.pth "
    "state dict (ffhq_10m.pt, 256x256_diffusion_uncond.pt)"
)


def _find_diffusers_dirs(root: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler_config.json) of a diffusers checkpoint folder, or CheckpointError."""
    if (root / "unet" / "config.json").is_file():
        unet_dir, candidates = root / "unet", [root / "scheduler" / "scheduler_config.json"]
    elif (root / "config.json").is_file():
        unet_dir = root
        candidates = [root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json"]
    else:
        raise CheckpointError(
            f"'{root}' is not a DDPM checkpoint folder: no unet/config.json or config.json; {_LAYOUTS}"
        )
    for c in candidates:
        if c.is_file():
            return unet_dir, c
    looked = [str(c) for c in candidates]
    raise CheckpointError(f"'{root}' has a UNet but no scheduler config (looked for {looked}); {_LAYOUTS}")


def _load_diffusers_unet(unet_dir: Path) -> UNet2DModel:
    """UNet2DModel.from_pretrained, refusing any missing / unexpected / mis-shaped weight."""
    try:
        unet, info = UNet2DModel.from_pretrained(unet_dir, output_loading_info=True, low_cpu_mem_usage=False)
    except Exception as err:  # noqa: BLE001 - re-raised with guidance
        raise CheckpointError(
            f"cannot load a UNet2DModel from '{unet_dir}': {type(err).__name__}: {err}; {_LAYOUTS}"
        ) from err
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(
            f"weights in '{unet_dir}' do not match its config.json ({ {k: list(v)[:5] for k, v in bad.items()} }); "
            "refusing a partly random network: check that the folder holds the checkpoint its config describes"
        )
    return unet


def _scheduler_betas(config: dict) -> torch.Tensor:
    """(T,) float64 betas of a DDPMScheduler config (linear and scaled_linear recomputed in float64)."""
    T = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    if schedule == "linear":
        return linear_betas(T, start, end)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    known = {k: v for k, v in config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(known).betas.to(torch.float64)


class DDPMPrior(PixelPrior):
    """A frozen noise-prediction UNet with its DDPM training schedule.

    Args:
        path: `embedded:<name>`, a local folder / .pt file, or a Hugging Face id (see module docstring).
        image_size: side of the images to solve for; None: the checkpoint's training size. The UNet is
            convolutional, so another size (a multiple of 2^(levels-1)) runs, off its training domain.
        allow_download: let a missing Hugging Face id be downloaded.
        device: where the network runs.
        precision: "fp32" | "fp16" | "bf16": dtype of the network's weights, or "amp_fp16" | "amp_bf16":
            float32 weights run under autocast; inputs and outputs stay float32.
        gradient_checkpointing: recompute the UNet's block activations in the backward pass (less
            memory for DPS, which differentiates through the network; same gradients, slower).
    Raises:
        CheckpointError: a wrong or missing path, an unknown layout, a scheduler prediction_type or
            variance_type we do not support (e.g. fixed_large), or mismatched weights.
    """

    def __init__(
        self,
        path: str,
        image_size: int | None = None,
        allow_download: bool = False,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        dtype = precision_dtype(precision)
        local = resolve_checkpoint(path, allow_download=allow_download)
        if local.is_file():
            if local.suffix not in (".pt", ".pth"):
                raise CheckpointError(f"'{local}' is a file but not a .pt/.pth guided-diffusion checkpoint; {_LAYOUTS}")
            self.unet, adm = load_adm_unet(local)
            betas = linear_betas(1000, 1e-4, 0.02)
            self.prediction_type, self.learned_variance = "epsilon", adm.learn_sigma
            trained_size = adm.image_size
        else:
            unet_dir, sched_file = _find_diffusers_dirs(local)
            self.unet = _load_diffusers_unet(unet_dir)
            sched = json.loads(sched_file.read_text())
            betas = _scheduler_betas(sched)
            self.prediction_type = sched.get("prediction_type", "epsilon")
            if self.prediction_type not in PREDICTION_TYPES:
                raise CheckpointError(f"{sched_file}: prediction_type must be one of {PREDICTION_TYPES}")
            variance_type = sched.get("variance_type") or "fixed_small"
            if variance_type not in VARIANCE_TYPES:
                raise CheckpointError(
                    f"{sched_file}: scheduler variance_type {variance_type!r} is not supported; use a checkpoint "
                    f"with one of {VARIANCE_TYPES} (absent = fixed_small): the solvers sample no other variance"
                )
            self.learned_variance = variance_type == "learned_range"
            size = self.unet.config.sample_size
            trained_size = size[0] if isinstance(size, (list, tuple)) else size
        c_in, c_out = self.unet.config.in_channels, self.unet.config.out_channels
        if c_out != (2 * c_in if self.learned_variance else c_in):
            raise CheckpointError(
                f"'{local}': UNet has {c_out} output channels for {c_in} input channels, which does not fit "
                f"{'a learned-range' if self.learned_variance else 'a fixed'} variance (2x / 1x the input channels)"
            )
        self.image_size = int(image_size or trained_size)
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image size {self.image_size} px is not divisible by the UNet's downsampling factor {factor} "
                f"({path}); use a multiple of {factor}, e.g. data.image_size={trained_size or factor * 8}"
            )
        if trained_size and self.image_size != trained_size:
            logger.warning("prior %s was trained at %s px but runs at %d px", path, trained_size, self.image_size)
        # float64 schedule on the CPU, deliberately not buffers (module.to(dtype) must not round them)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_train_timesteps = int(betas.numel())
        chain = ddpm_chain(self.alphas_cumprod)
        self._log_beta = chain.betas.log()
        self._log_beta_tilde = chain.posterior_log_variance_clipped
        self._tables_on: dict[str, dict[str, torch.Tensor]] = {}  # device -> float32 copies (see _tables)
        self.dtype, self.precision = dtype, precision
        self.unet.to(device)
        if self.unet.dtype != self.dtype:
            self.unet.to(self.dtype)
        freeze(self)
        if gradient_checkpointing:
            enable_checkpointing(self.unet)
        logger.info(
            "DDPM prior %s: %d px, T=%d, %s, learned variance %s",
            path, self.image_size, self.num_train_timesteps, self.prediction_type, self.learned_variance,
        )

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The timestep ids and schedule tables as tensors on `device` (float32), made once per device.

        Indexing these with a Python int is a view on the device: a sampling step copies nothing from
        the host (a host-to-device copy from pageable memory synchronises the CUDA stream).
        """
        f32 = {"device": device, "dtype": torch.float32}
        return per_device(self._tables_on, device, lambda: {
            "t": torch.arange(self.num_train_timesteps, device=device),
            "alphas_cumprod": self.alphas_cumprod.to(**f32),
            "log_beta": self._log_beta.to(**f32),
            "log_beta_tilde": self._log_beta_tilde.to(**f32),
        })

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, log_variance | None), both (B, 3, H, W) float32; differentiable w.r.t. x_t.

        Args:
            x_t: (B, 3, H, W) noisy images.
            t: one timestep in [0, T) for the batch, or a (B,) tensor of them.
        """
        b = x_t.shape[0]
        tables = self._tables(x_t.device)
        # an int t indexes the device tables (a view, no copy); a tensor t is moved once
        index = torch.as_tensor(t, dtype=torch.long).reshape(-1).to(x_t.device) if torch.is_tensor(t) else int(t)

        def per_sample(name: str) -> torch.Tensor:  # (B or 1, 1, 1, 1) float32 on x_t's device
            return tables[name][index].reshape(-1, 1, 1, 1)

        timesteps = tables["t"][index].expand(b)
        with network_autocast(self.precision, x_t.device):
            out = self.unet(x_t.to(self.dtype), timesteps).sample.float()  # (B, C or 2C, H, W)
        c = x_t.shape[1]
        pred, v = (out[:, :c], out[:, c:]) if self.learned_variance else (out, None)
        if self.prediction_type != "epsilon":
            ab = per_sample("alphas_cumprod")
            if self.prediction_type == "v_prediction":  # v = sqrt(ab) eps - sqrt(1 - ab) x0
                pred = (1 - ab).sqrt() * x_t + ab.sqrt() * pred
            else:  # "sample": the network predicts x0
                pred = (x_t - ab.sqrt() * pred) / (1 - ab).sqrt()
        if v is None:
            return pred, None
        frac = (v + 1) / 2
        log_var = frac * per_sample("log_beta") + (1 - frac) * per_sample("log_beta_tilde")
        return pred, log_var

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """eps_theta(x_t, t), (B, 3, H, W) float32; differentiable w.r.t. x_t."""
        return self.predict(x_t, t)[0]
