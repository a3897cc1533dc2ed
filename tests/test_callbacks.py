"""`Solver.solve(..., callback=...)`: called once per step with the documented state, changes nothing."""

from __future__ import annotations

import pytest
import torch
from test_g2d2 import toy_problem
from test_red_diff_dps import gaussian_problem

from g2d2.experiment.tracking import WandbLogger
from g2d2.solvers.dps import DPS
from g2d2.solvers.g2d2 import G2D2
from g2d2.solvers.pinv import PseudoInverse
from g2d2.solvers.red_diff import REDDiff

pytestmark = pytest.mark.usefixtures("one_thread")


def _g2d2_problem():
    prior, op, y, *_ = toy_problem(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    return prior, op, y.expand(2, -1, -1, -1)


def _pixel_problem():
    prior, op, _, y, _, _ = gaussian_problem("inpaint")
    return prior, op, y


# (solver, problem, keys of the state, number of steps, the final image from the last state)
CASES = {
    "dps": (lambda: DPS(num_steps=6), _pixel_problem, {"x_t", "x0"}, 6, lambda prior, s: s["x_t"]),
    # RED-Diff visits 5 timesteps and updates at the first 4 (the update at the last one is discarded)
    "red_diff": (lambda: REDDiff(num_steps=5, lr=0.05), _pixel_problem, {"x0", "loss"}, 4, lambda prior, s: s["x0"]),
    "g2d2": (lambda: G2D2(num_steps=4, inner_iters=3), _g2d2_problem, {"alpha", "tokens"}, 4,
             lambda prior, s: prior.decode_tokens(s["tokens"])),
}


@pytest.mark.parametrize("name", CASES)
def test_callback_sees_every_step_and_changes_nothing(name):
    make, problem, keys, steps, final = CASES[name]
    prior, op, y = problem()
    seen = []

    def callback(step, t, state):
        seen.append((step, t, {k: v.clone() for k, v in state.items()}))

    plain = make().solve(prior, op, y, generator=torch.Generator().manual_seed(3))
    traced = make().solve(prior, op, y, generator=torch.Generator().manual_seed(3), callback=callback)
    assert torch.equal(plain, traced)
    assert [s for s, _, _ in seen] == list(range(steps))
    times = [t for _, t, _ in seen]
    assert times == sorted(times, reverse=True) and len(set(times)) == steps
    assert all(set(state) == keys for _, _, state in seen)
    assert all(v.shape[0] == y.shape[0] for _, _, state in seen for v in state.values() if v.dim() > 0)
    # the last state is what the solver returns (before its final clamp)
    assert torch.equal(final(prior, seen[-1][2]).clamp(-1, 1), traced)


def test_pinv_has_no_steps():
    prior, op, y = _pixel_problem()
    calls = []
    PseudoInverse().solve(None, op, y, generator=torch.Generator(), callback=lambda *a: calls.append(a))
    assert calls == []


class _Run:
    """Stands for a W&B run: records what is logged."""

    def __init__(self):
        self.logged = []

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data):
        self.logged.append(data)


@pytest.mark.parametrize("name", ["red_diff", "g2d2"])
def test_wandb_trace_logs_every_nth_step_of_one_image(name):
    make, problem, _, steps, _ = CASES[name]
    prior, op, y = problem()
    tracker = WandbLogger(mode="disabled", trace_every=2)
    tracker.run = _Run()
    callback = tracker.step_callback(7, prior)
    assert tracker.step_callback(8, prior) is None  # one traced image per run
    make().solve(prior, op, y, generator=torch.Generator().manual_seed(0), callback=callback)
    logged = tracker.run.logged
    assert [d["trace/step"] for d in logged] == list(range(0, steps, 2))
    assert all(d["trace/image_index"] == 7 and "trace/estimate" in d for d in logged)
    assert all(("trace/loss" in d) == (name == "red_diff") for d in logged)
    with pytest.raises(ValueError, match="trace_every"):
        WandbLogger(trace_every=-1)
