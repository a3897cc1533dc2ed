"""Experiment tracking: W&B (offline by default) or nothing, plus time and peak-memory measurement."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from g2d2.data import to_uint8

logger = logging.getLogger(__name__)


@dataclass
class Cost:
    """Wall time and peak memory of one measured block."""

    seconds: float = float("nan")
    #: torch.cuda.max_memory_allocated over the block (MiB); None on CPU
    peak_gpu_mem_mb: float | None = None
    #: peak resident set size of the whole process so far (MiB): on CPU the only memory figure
    peak_rss_mb: float = float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


@contextmanager
def measure_cost(device: torch.device):
    """Measure seconds and peak GPU memory (reset at entry) of the enclosed block.

    Usage: `with measure_cost(device) as cost: ...` then read cost.seconds etc.
    """
    cost = Cost()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            cost.peak_gpu_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
        cost.seconds = time.perf_counter() - start
        cost.peak_rss_mb = peak_rss_mb()


def step_estimate(state: dict[str, torch.Tensor], prior: Any) -> torch.Tensor:
    """The first image's current estimate (3, H, W) from a solver step's callback state: the pixel solvers'
    "x0", or G2D2's most likely tokens under its fitted logits "alpha", decoded."""
    if "x0" in state:
        return state["x0"][0].detach().float()
    return prior.decode_tokens(state["alpha"][:1].argmax(dim=1))[0]


class NullLogger:
    """Logs nothing (logger=none); the output folder still holds every result."""

    url_or_dir: str | None = None

    def step_callback(self, index: int, prior: Any) -> Callable[[int, int, dict[str, torch.Tensor]], None] | None:
        """A `Solver.solve` callback that traces image `index`'s solve, or None (no tracing)."""
        return None

    def start(self, config: dict[str, Any], run_dir: Path, name: str, tags: list[str] | None = None) -> None:
        pass

    def log_image(self, index: int, name: str, metrics: dict[str, Any], grid: torch.Tensor | None) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases run: resolved config, per-image metrics, image grids and the summary.

    Args:
        mode: "offline" (default; files under ./wandb, upload later with `wandb sync`),
            "online" or "disabled".
        project, entity: W&B project and entity.
        group: runs of one experiment / sweep share a group.
        tags: extra tags (the runner adds task, solver and prior).
        trace_every: every this many solver steps, log the current estimate of the run's first solved image
            (and the step's scalar state, e.g. RED-Diff's loss) against the step; 0 = off.
    """

    def __init__(
        self,
        mode: str = "offline",
        project: str = "g2d2",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        trace_every: int = 0,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got {mode!r}")
        if isinstance(trace_every, bool) or not isinstance(trace_every, int) or trace_every < 0:
            raise ValueError(f"logger.trace_every must be an integer >= 0 (0 = off), got {trace_every!r}")
        self.trace_every, self.traced = trace_every, False
        self.mode, self.project, self.entity, self.group = mode, project, entity, group
        self.tags = list(tags or [])
        self.run = None

    def start(self, config: dict[str, Any], run_dir: Path, name: str, tags: list[str] | None = None) -> None:
        import wandb

        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            name=name,
            tags=self.tags + list(tags or []),
            config=config,
            mode=self.mode,
            dir=str(run_dir),
            reinit="finish_previous",
        )
        self.url_or_dir = self.run.url if self.mode == "online" else str(Path(self.run.dir).parent)
        logger.info("W&B run (%s): %s", self.mode, self.url_or_dir)

    def step_callback(self, index: int, prior: Any) -> Callable[[int, int, dict[str, torch.Tensor]], None] | None:
        if not self.trace_every or self.traced or self.run is None:
            return None
        self.traced = True  # one traced image per run
        import wandb

        self.run.define_metric("trace/*", step_metric="trace/step")

        def callback(step: int, t: int, state: dict[str, torch.Tensor]) -> None:
            if step % self.trace_every:
                return
            data: dict[str, Any] = {"trace/step": step, "trace/t": t, "trace/image_index": index}
            data.update({f"trace/{k}": v.float().mean().item() for k, v in state.items() if v.dim() == 0})
            data["trace/estimate"] = wandb.Image(to_uint8(step_estimate(state, prior)))
            self.run.log(data)

        return callback

    def log_image(self, index: int, name: str, metrics: dict[str, Any], grid: torch.Tensor | None) -> None:
        import wandb

        data: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        data["image_index"] = index
        if grid is not None:
            data["images"] = wandb.Image(to_uint8(grid), caption=f"{name}: ground truth | measurement | reconstruction")
        self.run.log(data)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for key, stats in summary.get("metrics", {}).items():
            self.run.summary[f"{key}_mean"] = stats["mean"]
            self.run.summary[f"{key}_std"] = stats["std"]
        for key in ("num_images", "num_failed", "num_expected"):
            self.run.summary[key] = summary.get(key, 0)
        self.run.summary["git_commit"] = summary.get("environment", {}).get("git_commit")

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
