"""Shared by the pixel-prior test files (test_pixel_prior, test_red_diff_dps, test_guided_diffusion)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models and problems: one intra-op thread avoids OpenMP contention on a busy 2-core
    machine (measured 4-10x faster here under load); restored afterwards. Import it into a test
    module (`from pixel_toys import one_thread  # noqa: F401`) to apply it to every test there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
