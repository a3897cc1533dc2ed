"""Exact identities and seeded behaviour of every forward operator, and every conf/task/*.yaml."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from g2d2.operators import (
    BoxInpainting,
    CompressiveSensing,
    GaussianBlur,
    Identity,
    LinearOperator,
    MotionBlur,
    RandomInpainting,
    SuperResolution,
)
from g2d2.operators.base import PerImageOperators, per_image
from g2d2.operators.blur import gaussian_kernel
from g2d2.operators.resize import symmetric_pad_indices

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
SIZE = 32

# name -> builder(image_size, generator); small sizes, unscaled where reference_size would shrink too much
BUILDERS = {
    "sr4_bicubic": lambda n, g: SuperResolution(n, factor=4, mode="bicubic", generator=g),
    "sr4_avgpool": lambda n, g: SuperResolution(n, factor=4, mode="avgpool", generator=g),
    "gauss_deblur": lambda n, g: GaussianBlur(n, kernel_size=9, std=2.0, reference_size=None, generator=g),
    "motion_deblur": lambda n, g: MotionBlur(n, kernel_size=11, reference_size=None, generator=g),
    "inpaint_box": lambda n, g: BoxInpainting(n, box_size=12, margin=2, reference_size=None, generator=g),
    "inpaint_random": lambda n, g: RandomInpainting(n, missing_fraction=[0.3, 0.7], generator=g),
    "cs": lambda n, g: CompressiveSensing(n, ratio=0.25, generator=g),
    "denoise": lambda n, g: Identity(n, generator=g),
}
RANDOM = ["motion_deblur", "inpaint_box", "inpaint_random", "cs"]


def build(name: str, seed: int = 0, n: int = SIZE) -> LinearOperator:
    return BUILDERS[name](n, torch.Generator().manual_seed(seed))


def rand_image(n: int = SIZE, seed: int = 1, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, n, n, generator=g, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("name", list(BUILDERS))
def test_adjoint_identity(name: str) -> None:
    op = build(name)
    x = rand_image()
    y = torch.randn_like(op(x))
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), abs(rhs), 1.0)
    assert op.adjoint(y).shape == x.shape


@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_is_linear_and_float32_works(name: str) -> None:
    op = build(name)
    x1, x2 = rand_image(seed=2), rand_image(seed=3)
    torch.testing.assert_close(op(2 * x1 - x2), 2 * op(x1) - op(x2), rtol=1e-10, atol=1e-10)
    y32 = op(x1.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), op(x1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pinv_is_a_right_inverse_where_exact(name: str) -> None:
    """A A^+ y = y for every operator whose pseudo-inverse is exact (all but the blurs)."""
    if "deblur" in name:
        pytest.skip("blur pinv is a regularised Wiener inverse; tested separately")
    op = build(name)
    y = op(rand_image())
    torch.testing.assert_close(op(op.pinv(y)), y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["inpaint_box", "inpaint_random", "sr4_avgpool", "cs", "denoise"])
def test_pinv_recovers_images_in_the_range(name: str) -> None:
    op = build(name)
    x = rand_image()
    if name == "sr4_avgpool":  # an image in the row space: nearest-upsampled
        x = F.interpolate(rand_image(SIZE // 4), scale_factor=4, mode="nearest")
    elif name == "cs":  # A^T y lies in the row space
        x = op.adjoint(torch.randn_like(op(x)))
    x_hat = op.pinv(op(x))
    if name.startswith("inpaint"):
        mask = op.mask.bool().expand_as(x)
        torch.testing.assert_close(x_hat[mask], x[mask], rtol=0, atol=0)
        assert (x_hat[~mask] == 0).all()
        assert 0 < mask.float().mean() < 1
    else:
        torch.testing.assert_close(x_hat, x, rtol=0, atol=1e-10)


def test_bicubic_matches_direct_symmetric_pad_interpolate() -> None:
    op = build("sr4_bicubic", n=64)
    x = rand_image(64)
    idx = symmetric_pad_indices(64, 8)  # 2 * factor px, numpy "symmetric"
    padded = np.pad(x[0, 0].numpy(), ((0, 0), (8, 8)), mode="symmetric")
    np.testing.assert_array_equal(x[0, 0].numpy()[:, idx.numpy()], padded)
    ref = F.interpolate(x[..., idx, :][..., idx], scale_factor=0.25, mode="bicubic", antialias=True)
    ref = ref[..., 2:-2, 2:-2]
    torch.testing.assert_close(op(x), ref, rtol=0, atol=1e-12)
    assert op(x).shape == (2, 3, 16, 16)
    # a constant image stays constant (weights sum to 1, also at the borders)
    torch.testing.assert_close(op(torch.full_like(x, 0.3)), torch.full((2, 3, 16, 16), 0.3, dtype=x.dtype))


def test_avgpool_matches_torch() -> None:
    x = rand_image()
    torch.testing.assert_close(build("sr4_avgpool")(x), F.avg_pool2d(x, 4), rtol=0, atol=1e-12)


def test_bicubic_pinv_is_exact_and_stable() -> None:
    op = build("sr4_bicubic", n=64)
    y = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(op(op.pinv(y)), y, rtol=0, atol=1e-10)
    # minimum-norm: pinv(y) is orthogonal to the null space, i.e. pinv(A pinv y) = pinv y
    x = op.pinv(y)
    torch.testing.assert_close(op.pinv(op(x)), x, rtol=0, atol=1e-10)
    assert torch.linalg.svdvals(op.matrix).min() > 0.3  # noise gain of A^+ at most ~3x per axis


def test_blur_pinv_inverts_a_mild_blur() -> None:
    """With a tiny regulariser the Wiener inverse (shared by both blurs) undoes an invertible blur."""
    op = GaussianBlur(SIZE, kernel_size=5, std=0.5, reference_size=None, pinv_reg=1e-8)
    x = F.avg_pool2d(rand_image(), 3, stride=1, padding=1, count_include_pad=False)  # smooth-ish
    x_hat = op.pinv(op(x))
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert (x_hat - x)[inner].abs().max() < 1e-3
    assert (op(x) - x)[inner].abs().max() > 1e-2  # the blur did something


def test_gaussian_kernel_is_dps_truncated_renormalised_gaussian() -> None:
    """DPS's kernel: scipy's gaussian_filter of a 61 x 61 delta at std 3, i.e. the Gaussian cut at
    4 std (radius int(4 * 3 + 0.5) = 12: a 25 x 25 support) and renormalised there, not sampled on the
    whole window."""
    kernel = GaussianBlur(256, generator=torch.Generator().manual_seed(0)).kernel  # the DPS protocol size
    x = torch.arange(-30, 31, dtype=torch.float64)
    g = torch.where(x.abs() <= 12, torch.exp(-(x**2) / (2 * 3.0**2)), torch.zeros_like(x))
    closed_form = g[:, None] * g[None, :] / g.sum() ** 2
    torch.testing.assert_close(kernel, closed_form, rtol=0, atol=1e-17)
    assert kernel[30, 30 + 12] > 0 and kernel[30, 30 + 13] == 0 and kernel.sum().item() == pytest.approx(1, abs=1e-15)
    # the full-window sampled Gaussian differs by more than rounding (its tail beyond 4 std)
    full = torch.exp(-(x**2) / (2 * 3.0**2))
    assert (kernel - full[:, None] * full[None, :] / full.sum() ** 2).abs().max() > 1e-6 * kernel.max()


@pytest.mark.parametrize("size,std", [(61, 3.0), (15, 0.75), (5, 0.5), (7, 3.0), (3, 2.0), (9, 1.3)])
def test_gaussian_kernel_equals_scipy_gaussian_filter_of_a_delta(size: int, std: float) -> None:
    """Also where the 4-std support overhangs the window (7 px at std 3, 3 px at std 2): scipy folds the
    overhanging taps back ("reflect" boundary), which keeps the sum 1."""
    import scipy.ndimage

    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1
    np.testing.assert_allclose(
        gaussian_kernel(size, std).numpy(), scipy.ndimage.gaussian_filter(delta, std), rtol=0, atol=1e-15
    )


def test_blur_keeps_constant_images() -> None:
    op = GaussianBlur(64, generator=torch.Generator().manual_seed(0))  # 15 px kernel, std 0.75
    c = torch.full((1, 3, 64, 64), 0.5, dtype=torch.float64)
    torch.testing.assert_close(op(c), c, rtol=0, atol=1e-12)  # reflect padding: no dark borders


def test_blur_spectrum_is_computed_once_per_dtype(monkeypatch) -> None:
    op = GaussianBlur(64, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = (op(x), op.adjoint(x), op(x.double()))
    built = []
    build = type(op)._kernel_spectrum
    monkeypatch.setattr(type(op), "_kernel_spectrum", lambda self, dtype: built.append(dtype) or build(self, dtype))
    fresh = GaussianBlur(64, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # as a solver does at every step
        again = (fresh(x), fresh.adjoint(x), fresh(x.double()))
    assert built == [torch.float32, torch.float64]
    for a, b in zip(again, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh.to("cpu")  # moving the operator empties its cache
    fresh(x)
    assert built == [torch.float32, torch.float64, torch.float32]


def test_operators_cast_their_float64_tensors_once_per_dtype() -> None:
    op = SuperResolution(64, factor=4)
    x = torch.rand(1, 3, 64, 64, dtype=torch.float32)
    op(x)
    r32 = op.as_dtype("matrix", torch.float32)
    op(x), op.adjoint(op(x))
    assert op.as_dtype("matrix", torch.float32) is r32  # the same tensor: cast once
    assert op.as_dtype("matrix", torch.float64) is op.matrix  # already that dtype: no copy


@pytest.mark.parametrize("name", RANDOM)
def test_state_is_seeded(name: str) -> None:
    a, b, c = build(name, 0), build(name, 0), build(name, 1)
    sa, sb, sc = a.state(), b.state(), c.state()
    assert sa and sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_per_image_operators_apply_row_i_with_operator_i(name: str) -> None:
    """A batch measured image by image: row i goes through operator i, the adjoint identity holds,
    and operators without their own draw collapse to one (no per-row loop)."""
    ops = [build(name, seed) for seed in (0, 1, 2)]
    batch = per_image(ops)
    if name not in RANDOM:
        assert batch is ops[0]
        return
    assert isinstance(batch, PerImageOperators)
    x = rand_image(batch=3)
    y = torch.randn_like(batch(x))
    for i, op in enumerate(ops):
        for method, arg in (("forward", x), ("adjoint", y), ("pinv", y)):
            torch.testing.assert_close(getattr(batch, method)(arg)[i : i + 1], getattr(op, method)(arg[i : i + 1]))
    lhs, rhs = (batch(x) * y).sum(), (x * batch.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), abs(rhs), 1.0)
    assert not torch.equal(batch(x)[0], ops[0](x[1:2])[0])  # the rows really differ in their operator
    with pytest.raises(ValueError, match="3 per-image operators, got a batch of 2"):
        batch(x[:2])
    assert per_image([ops[0], build(name, 0)]) is ops[0]  # equal draws: one operator
    with pytest.raises(ValueError, match="at least one"):
        per_image([])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_to_device_and_state_tensors(name: str) -> None:
    op = build(name).to("cpu")
    assert all(isinstance(v, torch.Tensor) for v in op.state().values())


@pytest.mark.parametrize("seed", range(5))
def test_motion_kernels_are_valid(seed: int) -> None:
    op = MotionBlur(256, generator=torch.Generator().manual_seed(seed))
    k = op.kernel
    assert k.shape == (61, 61)
    assert (k >= 0).all()
    assert abs(k.sum().item() - 1.0) < 1e-12
    assert k.max() < 0.5  # an actual trajectory, not a single dot


def test_sizes_scale_with_image_size() -> None:
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert GaussianBlur(256, generator=g()).kernel.shape == (61, 61)
    assert GaussianBlur(64, generator=g()).kernel.shape == (15, 15)
    assert GaussianBlur(64, generator=g()).std == pytest.approx(0.75)
    assert MotionBlur(64, generator=g()).kernel.shape == (15, 15)
    assert GaussianBlur(64, reference_size=None, generator=g()).kernel.shape == (61, 61)
    big, small = BoxInpainting(256, generator=g()), BoxInpainting(64, generator=g())
    assert (big.box_size, big.margin, small.box_size, small.margin) == (128, 16, 32, 4)
    assert (1 - small.mask).sum() == 32 * 32
    centred = BoxInpainting(64, random_position=False)
    assert (centred.top, centred.left) == (16, 16)


def test_box_position_stays_within_margins() -> None:
    for seed in range(20):
        op = BoxInpainting(64, generator=torch.Generator().manual_seed(seed))
        assert 4 <= op.top <= 64 - 4 - 32 and 4 <= op.left <= 64 - 4 - 32


def test_random_inpainting_fraction() -> None:
    op = RandomInpainting(SIZE, missing_fraction=0.7, generator=torch.Generator().manual_seed(0))
    assert (1 - op.mask).sum().item() == round(0.7 * SIZE * SIZE)
    fractions = {build("inpaint_random", s).missing_fraction for s in range(5)}
    assert len(fractions) == 5 and all(0.3 <= f <= 0.7 for f in fractions)


def test_compressive_sensing_has_orthonormal_rows() -> None:
    op = build("cs")
    assert op(rand_image()).shape == (2, round(0.25 * 3 * SIZE * SIZE))
    y = torch.randn(2, op.num_measurements, dtype=torch.float64)
    torch.testing.assert_close(op(op.adjoint(y)), y, rtol=0, atol=1e-12)  # A A^T = I
    torch.testing.assert_close(op.pinv(y), op.adjoint(y))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SuperResolution(30, factor=4), "does not divide image_size 30"),
        (lambda: SuperResolution(32, mode="nearest"), "mode must be one of"),
        (lambda: BoxInpainting(32, box_size=30, margin=2, reference_size=None), "does not fit"),
        (lambda: GaussianBlur(16, reference_size=None), "too large"),
        (lambda: RandomInpainting(32, missing_fraction=1.5), r"\[0, 1\)"),
        (lambda: CompressiveSensing(32, ratio=0.0), r"\(0, 1\]"),
        (lambda: MotionBlur(32, intensity=2.0), r"\[0, 1\]"),
    ],
)
def test_invalid_configurations_raise(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_image_shape_raises() -> None:
    with pytest.raises(ValueError, match="expects images of shape"):
        build("gauss_deblur")(torch.zeros(1, 3, SIZE + 4, SIZE + 4))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_measure(name: str) -> None:
    op = build(name)
    x = rand_image()
    with pytest.raises(ValueError, match="sigma"):
        op.measure(x, -0.1, torch.Generator().manual_seed(0))
    y1 = op.measure(x, 0.05, torch.Generator().manual_seed(3))
    y2 = op.measure(x, 0.05, torch.Generator().manual_seed(3))
    y3 = op.measure(x, 0.05, torch.Generator().manual_seed(4))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert torch.equal(op.measure(x, 0.0), op(x))
    assert abs((y1 - op(x)).std().item() - 0.05) < 0.01


def _compose_task(task: str, image_size: int = 64):
    """Compose the real config.yaml with task=<task> at the given image size."""
    from conftest import compose_config

    return compose_config([f"task={task}", f"data.image_size={image_size}"])


@pytest.mark.parametrize("task", TASKS)
def test_task_config_composes_and_instantiates(task: str) -> None:
    cfg = _compose_task(task)
    assert cfg.task.name == task
    assert cfg.task.sigma >= 0
    op = hydra.utils.instantiate(cfg.task.operator, generator=torch.Generator().manual_seed(0))
    assert isinstance(op, LinearOperator)
    x = rand_image(64, batch=1).float()
    y = op.measure(x, cfg.task.sigma, torch.Generator().manual_seed(0))
    assert torch.isfinite(op.pinv(y)).all() and op.pinv(y).shape == x.shape


def test_all_tasks_have_configs() -> None:
    expected = {"sr4", "sr4_avgpool", "gauss_deblur", "motion_deblur", "inpaint_box", "inpaint_random",
                "cs", "denoise"}
    assert expected <= set(TASKS)
