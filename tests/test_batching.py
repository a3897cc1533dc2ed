"""Batched == sequential: with one generator per image (what the runner passes), image b of a batched solve
gets the reconstruction of its solve alone with generator b, for every solver; and at the runner level,
batch_size=2 writes the numbers of batch_size=1."""

from __future__ import annotations

import pytest
import torch
from test_red_diff_dps import gaussian_problem
from vq_toys import make_tiny_vq_diffusion

from g2d2 import rng
from g2d2.noise.markov import MarkovPosterior
from g2d2.noise.star import StarShaped
from g2d2.operators.base import PerImageOperators
from g2d2.operators.resize import SuperResolution
from g2d2.priors.discrete import VQDiffusionPrior
from g2d2.solvers.dps import DPS
from g2d2.solvers.g2d2 import G2D2
from g2d2.solvers.red_diff import REDDiff

pytestmark = pytest.mark.usefixtures("one_thread")


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def batched_and_sequential(solver, prior, operators, ys, seeds=(3, 4, 5)):
    """The batched solve of the problems (one generator per image) and the concatenated single solves."""
    batched = solver.solve(prior, PerImageOperators(operators), torch.cat(ys), generator=generators(seeds))
    single = torch.cat([solver.solve(prior, op, y, generator=generators([s]))
                        for op, y, s in zip(operators, ys, seeds, strict=True)])
    return batched, single


@pytest.mark.parametrize("process", [StarShaped, MarkovPosterior])
def test_g2d2_batch_equals_its_images_solved_alone(tmp_path, process):
    prior = VQDiffusionPrior(str(make_tiny_vq_diffusion(tmp_path / "vqd", text=False)))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, prior.num_codes, (3, prior.num_tokens), generator=g)
    x = prior.decode_tokens(tokens)
    op = SuperResolution(image_size=prior.image_size, factor=4)
    ys = [op.measure(x[i : i + 1], 0.05, g) for i in range(3)]
    batched, single = batched_and_sequential(G2D2(process(), num_steps=4, inner_iters=3), prior, [op] * 3, ys)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert (single[0] - single[1]).abs().max() > 0.1  # different problems, different answers


@pytest.mark.parametrize("solver", [REDDiff(num_steps=20, lr=0.1), DPS(num_steps=20, scale=0.5)],
                         ids=["red_diff", "dps"])
def test_pixel_solvers_batch_equals_their_images_solved_alone(solver):
    problems = [gaussian_problem("inpaint", seed) for seed in (0, 1, 2)]
    prior = problems[0][0]
    operators, ys = [p[1] for p in problems], [p[3] for p in problems]
    batched, single = batched_and_sequential(solver, prior, operators, ys)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert (single[0] - single[1]).abs().max() > 0.1


def test_per_image_draws_take_row_b_from_generator_b():
    rows = rng.randn((3, 2, 5), generators([7, 8, 9]))
    for b, seed in enumerate((7, 8, 9)):
        assert torch.equal(rows[b : b + 1], torch.randn((1, 2, 5), generator=torch.Generator().manual_seed(seed)))
    one = rng.rand((3, 4), torch.Generator().manual_seed(7))  # one generator: one stream for the whole batch
    assert torch.equal(one, torch.rand((3, 4), generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="2 per-image generators for a batch of 3"):
        rng.rand((3, 4), generators([1, 2]))


@pytest.mark.parametrize("solver", ["g2d2", "red_diff"])
def test_runner_batch_size_does_not_change_the_numbers(tmp_path, solver):
    """Two embedded images at batch_size=1 and batch_size=2 (a short budget): the same metrics per image."""
    from conftest import compose_config, read_jsonl

    from g2d2.experiment.runner import run

    steps = ["solver.num_steps=3", "solver.inner_iters=2"] if solver == "g2d2" else ["solver.num_steps=5"]
    prior = "prior=tiny_vq" if solver == "g2d2" else "prior=tiny_ddpm"
    args = [f"solver={solver}", prior, *steps, "data.limit=2", "logger=none", "save_images=false", "progress=false"]
    for b in (1, 2):
        run(compose_config([*args, f"batch_size={b}"]), tmp_path / f"b{b}")
    records = {b: read_jsonl(tmp_path / f"b{b}" / "metrics.jsonl") for b in (1, 2)}
    assert [r["batch_size"] for r in records[2]] == [2, 2]
    for one, two in zip(records[1], records[2], strict=True):
        assert one["index"] == two["index"]
        for key in ("psnr", "ssim", "lpips"):
            assert one[key] == pytest.approx(two[key], abs=1e-4), key
