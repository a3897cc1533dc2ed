"""Timing a solve without perturbing it: a step clock on the prior network and a host-sync counter.

A forward pre-hook on the prior network marks the start of every outer solver step. The device is
synchronised only at the two edges of the timed window, so the solver runs asynchronously in between,
as it would unobserved and as the bare prior is timed (back-to-back calls, one synchronisation at each
end). Host syncs are counted as the warnings of torch.cuda.set_sync_debug_mode("warn") raised inside
that window: each one stalls the host until the GPU catches up.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator

import torch

from g2d2.experiment.tracking import measure_cost
from g2d2.rng import Generators
from g2d2.solvers.base import NonFiniteError

logger = logging.getLogger(__name__)


class StopSolve(Exception):
    """Raised by a step hook once enough steps are timed (or profiled): ends the solve early."""


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Mean seconds of fn() over `reps` back-to-back calls, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def is_sync_warning(w: warnings.WarningMessage) -> bool:
    """A warning of torch.cuda.set_sync_debug_mode("warn"): "called a synchronizing CUDA operation"."""
    return "synchroniz" in str(w.message).lower()


def _replay(log: list[warnings.WarningMessage]) -> None:
    """Re-emit, once each, the warnings other than sync warnings that recording swallowed."""
    seen = set()
    for w in log:
        key = (w.category, str(w.message), w.filename, w.lineno)
        if not is_sync_warning(w) and key not in seen:
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


@contextlib.contextmanager
def host_sync_log(device: torch.device, enabled: bool = True) -> Iterator[list | None]:
    """Record the warnings of the block with torch.cuda's sync debug mode at "warn".

    Yields the list the warnings go to, or None (not CUDA, not enabled, or the sync debug mode failed:
    the count is then None). The previous sync debug mode is restored at exit, and warnings other than
    sync warnings are re-emitted.
    """
    previous = None
    if enabled and device.type == "cuda":
        try:
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        except Exception as err:  # noqa: BLE001 - a diagnostic: never break a row
            logger.warning("sync debug mode unavailable, host syncs not counted: %s", err)
            previous = None
    if previous is None:
        yield None
        return
    log = []
    try:
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            yield log
    finally:
        try:
            torch.cuda.set_sync_debug_mode(previous)
        except Exception as err:  # noqa: BLE001
            logger.warning("could not restore the sync debug mode %s: %s", previous, err)
        _replay(log)


class StepClock:
    """Forward pre-hook on the prior network: one call = the start of one outer solver step.

    Steps 0 .. warmup-1 are warm-up, steps warmup .. warmup+measure-1 are timed. The device is synchronised
    (and the time and the sync-warning count taken) only at the two edges of that window: when step `warmup`
    starts, and when step warmup+measure starts (StopSolve is then raised) or the solve ends (`close`). The
    steps in between are only counted. If the solve ends within the warm-up, the window falls back to the
    start of step 0 (stamped without synchronisation).
    """

    def __init__(self, device: torch.device, warmup: int, measure: int, log: list | None = None) -> None:
        self.device, self.warmup, self.measure, self.log = device, warmup, measure, log
        self.calls = 0  # steps started
        self.first = self.start = self.end = None  # (perf_counter, len(log)) at step 0, window start, window end
        self.end_calls = 0

    def _logged(self) -> int:
        return len(self.log) if self.log is not None else 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        if self.calls == self.warmup + self.measure:
            self.close()
            raise StopSolve
        if self.calls == self.warmup:  # window start: synchronise, then stamp (the sync itself is not counted)
            sync(self.device)
            self.start = (time.perf_counter(), self._logged())
        elif self.calls == 0:
            self.first = (time.perf_counter(), self._logged())
        self.calls += 1

    def close(self) -> None:
        """Window end: count the syncs, then synchronise and stamp (once; the hook or the end of the solve)."""
        if self.end is None:
            logged = self._logged()
            sync(self.device)
            self.end, self.end_calls = (time.perf_counter(), logged), self.calls

    def result(self) -> dict:
        """s_per_step and host_syncs_per_step over the steps timed (steps_timed), with a note on a fallback."""
        origin, steps, note = self.start, self.end_calls - self.warmup, None
        if origin is None:  # the solve ended within the warm-up: time every step it ran
            origin, steps = self.first, self.end_calls
            note = f"solve ended within the warm-up: {steps} step(s) timed from step 0"
        if origin is None or self.end is None or steps < 1:
            return {"s_per_step": float("nan"), "steps_timed": 0, "host_syncs_per_step": None}
        syncs = None
        if self.log is not None:
            syncs = sum(map(is_sync_warning, self.log[origin[1] : self.end[1]])) / steps
        out = {"s_per_step": (self.end[0] - origin[0]) / steps, "steps_timed": steps, "host_syncs_per_step": syncs}
        return {**out, "note": note} if note else out


def measure_solve(
    solver, prior, network: torch.nn.Module, operator, y, device: torch.device, warmup: int, measure: int,
    generator: Generators, count_syncs: bool = True,
) -> dict:
    """Run solver.solve until warmup + measure steps are timed: per-step seconds, host syncs and peak memory.

    `network` is the module the solver calls once per outer step (the prior's transformer or UNet); `generator`
    is what the runner passes the solve (one per image).
    A solve that diverges (NonFiniteError, possible with random weights) keeps the steps timed before it.
    """
    clock = StepClock(device, warmup, measure)
    handle = network.register_forward_pre_hook(clock)
    note = None
    try:
        with measure_cost(device) as cost, host_sync_log(device, count_syncs) as log:
            clock.log = log
            try:
                solver.solve(prior, operator, y, generator=generator)
                clock.close()  # fewer steps than asked for: the end of the solve closes the last step
            except StopSolve:
                pass
            except NonFiniteError as err:
                clock.close()
                note = f"stopped early: {err}"
    finally:
        handle.remove()
    out = {**clock.result(), "peak_gpu_mib": cost.peak_gpu_mem_mb}
    if note:
        out["note"] = f"{note}; {out['note']}" if out.get("note") else note
    return out
