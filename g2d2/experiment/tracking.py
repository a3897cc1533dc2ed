"""Experiment tracking: W&B (offline by default) or nothing, plus time and peak-memory measurement."""

from __future__ import annotations

import logging
import resource
import sys
import time
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


class NullLogger:
    """Logs nothing (logger=none); the output folder still holds every result."""

    url_or_dir: str | None = None

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
    """

    def __init__(
        self,
        mode: str = "offline",
        project: str = "g2d2",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got {mode!r}")
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
