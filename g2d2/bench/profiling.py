"""A torch.profiler table of one solver step: where the time of a step goes, for the overhead column."""

from __future__ import annotations

from pathlib import Path

import torch

from g2d2.bench import timing
from g2d2.rng import Generators


class ProfileSteps:
    """Forward pre-hook: start the profiler when step `warmup` starts, stop it and the solve one step later."""

    def __init__(self, profiler, warmup: int = 1) -> None:
        self.profiler, self.warmup, self.calls, self.running = profiler, warmup, 0, False

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        if self.calls == self.warmup:
            self.profiler.start()
            self.running = True
        elif self.calls == self.warmup + 1:
            self.stop()
            raise timing.StopSolve
        self.calls += 1

    def stop(self) -> None:
        """Stop the profiler if it runs (a profiler left on would slow every later row's timing)."""
        if self.running:
            self.profiler.stop()
            self.running = False


def profile_step(
    solver, prior, network: torch.nn.Module, operator, y, device: torch.device, path: Path, generator: Generators
) -> None:
    """Write a torch.profiler table of one solver step (after one warm-up step) to `path`.

    Sorted by device time on CUDA, CPU time otherwise. The profiler is stopped however the solve ends.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    profiler = profile(activities=activities)
    hook = ProfileSteps(profiler)
    handle = network.register_forward_pre_hook(hook)
    try:
        solver.solve(prior, operator, y, generator=generator)
    except timing.StopSolve:
        pass
    finally:
        handle.remove()
        hook.stop()  # the solve ended (or failed) inside the profiled step
    if hook.calls <= hook.warmup:
        path.write_text("solve ended before a step could be profiled\n")
        return
    timing.sync(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=40)
    path.write_text(f"one solver step on {device}, sorted by {sort}\n\n{table}\n")
