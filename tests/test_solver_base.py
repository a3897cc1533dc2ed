"""The solver toolbox: the NaN/Inf guard that reads the device only every few steps, and the device
generator every per-step draw comes from."""

from __future__ import annotations

import pytest
import torch

from g2d2.rng import device_generator
from g2d2.solvers.base import FiniteGuard, NonFiniteError


def test_guard_names_the_window_in_which_the_iterate_broke():
    guard = FiniteGuard("toy x", every=3)
    ok, bad = torch.zeros(4), torch.tensor([0.0, float("nan"), 0.0, 0.0])
    for step in range(3):  # steps 0-2 are read at step 2: all finite
        guard.update(ok, step)
    guard.update(bad, 3)  # folded, not read yet
    guard.update(ok, 4)  # a finite iterate after the NaN does not clear the flag
    with pytest.raises(NonFiniteError, match="toy x became NaN/Inf between steps 3 and 5"):
        guard.update(ok, 5)


def test_guard_reads_the_flag_only_every_few_steps_and_at_the_end():
    guard = FiniteGuard("toy x", every=10)
    guard.update(torch.tensor([float("inf")]), 0)  # no read at step 0 of 10
    with pytest.raises(NonFiniteError, match="at step 0;"):
        guard.finish()
    guard.finish()  # nothing pending after a read: no error, no read
    every_step = FiniteGuard("toy x", every=1)
    with pytest.raises(NonFiniteError, match="at step 7"):
        every_step.update(torch.tensor([float("nan")]), 7)
    with pytest.raises(ValueError, match="every >= 1"):
        FiniteGuard("toy x", every=0)


def test_device_generator_takes_one_draw_from_the_cpu_generator():
    a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    g1, g2 = device_generator(a, "cpu"), device_generator(b, "cpu")
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    reference = torch.Generator().manual_seed(4)
    torch.randint(0, 2**62, (1,), generator=reference)
    assert torch.equal(a.get_state(), reference.get_state())
    assert not torch.equal(torch.rand(5, generator=device_generator(a, "cpu")), torch.rand(5, generator=g1))
