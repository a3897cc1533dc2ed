"""Time-budgeted, resumable training loop shared by the tiny-prior stages (scripts/train_tiny_priors.py).

A stage trains for a wall-clock budget (total over resumes, setup and export excluded); the learning
rate follows the fraction of the budget used. The full training state (models, EMA, optimiser,
step, images seen, elapsed time, the data generator's RNG state, history) is saved atomically to
<work-dir>/<stage>/state.pt every `save_every_s` and at the end; `resume` continues from it.
Losses are accumulated on the device and read back only at log time (no per-step host sync).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from g2d2.train import models as T
from g2d2.train import trainset

logger = logging.getLogger(__name__)
STAGES = ("vq", "transformer", "ddpm")


class Stage:
    """Time-budgeted, resumable training loop shared by the three stages.

    Subclass hooks: `build()` creates models/optimisers and returns the dict of objects with
    state_dict() to checkpoint; `step(step, frac)` does one update and returns loss tensors (no
    host sync); `evaluate()` returns held-out metrics (floats); `export()` writes the weights.
    """

    name = ""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.minutes = getattr(args, f"minutes_{self.name}")
        self.batch = getattr(args, f"batch_{self.name}")
        self.lr = getattr(args, f"lr_{self.name}")
        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        self.out = Path(args.out)
        self.state_path = Path(args.work_dir) / self.name / "state.pt"
        self.generator = torch.Generator(device=device).manual_seed(args.seed + 1000 * STAGES.index(self.name))
        self.history: list[dict] = []

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def optimizer(self, params) -> torch.optim.Optimizer:
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused)

    def data(self, size: int = 64, permute_channels: bool = False) -> trainset.TrainingImages:
        kwargs = dict(num_shapes=16, chunk=16) if self.args.tiny else None
        return trainset.TrainingImages(size, self.device, self.args.dead_leaves_fraction, seed=self.args.seed,
                                        dead_leaves_kwargs=kwargs, permute_channels=permute_channels)

    def fmt(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.args.channels_last else x

    def run(self) -> dict:
        t_setup = time.time()
        objects = self.build()
        step, images, elapsed = 0, 0, 0.0
        if self.args.resume and self.state_path.exists():
            step, images, elapsed = self.load_state(objects)
            logger.info("[%s] resumed from %s at step %d (%.2f min done)", self.name, self.state_path, step,
                        elapsed / 60)
        elif self.args.resume:
            logger.warning("[%s] --resume but no state at %s: starting fresh", self.name, self.state_path)
        setup_s = time.time() - t_setup
        budget = 60.0 * self.minutes
        logger.info("[%s] setup %.1f s; training for %.2f min (%.2f left), batch %d, bf16 %s, device %s",
                    self.name, setup_s, self.minutes, max(0.0, budget - elapsed) / 60, self.batch, self.bf16,
                    self.device)
        t0, base_elapsed = time.time(), elapsed
        last_log = last_eval = t0
        last_save = t0 - self.args.save_every_s  # save at the first good log, so a NaN can always roll back
        log_step, log_images, sums = step, images, {}
        while elapsed < budget:
            frac = elapsed / budget
            for group in self.opt.param_groups:
                group["lr"] = self.lr * T.lr_factor(step, frac)
            losses = self.step(step, frac)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            step, images = step + 1, images + self.batch
            now = time.time()
            elapsed = base_elapsed + now - t0
            if now - last_log < self.args.log_every_s and elapsed < budget:
                continue
            n = step - log_step
            vals = {k: round((v / n).item(), 5) for k, v in sums.items()}  # host sync
            if not all(math.isfinite(v) for v in vals.values()):
                step, images = self.roll_back(objects, vals)
                log_step, log_images, sums, last_log = step, images, {}, time.time()
                continue
            now = time.time()
            rate = (images - log_images) / max(now - last_log, 1e-6)
            entry = dict(step=step, minutes=round(elapsed / 60, 3), img_per_s=round(rate, 1), **vals)
            if now - last_eval >= self.args.eval_every_s:
                entry.update(self.evaluate())
                last_eval = time.time()
            self.history.append(entry)
            logger.info("[%s] %s", self.name, " ".join(f"{k}={v}" for k, v in entry.items()))
            if now - last_save >= self.args.save_every_s or elapsed >= budget:
                self.save_state(objects, step, images, elapsed)
                last_save = time.time()
            log_step, log_images, sums, last_log = step, images, {}, time.time()
        t_exp = time.time()
        metrics = self.export()
        report = dict(stage=self.name, steps=step, images_seen=images, train_minutes=round(elapsed / 60, 3),
                      img_per_s=round(images / max(elapsed, 1e-6), 1), setup_seconds=round(setup_s, 1),
                      export_seconds=round(time.time() - t_exp, 1), batch_size=self.batch, lr=self.lr,
                      bf16=self.bf16, seed=self.args.seed, tiny=self.args.tiny,
                      dead_leaves_fraction=self.args.dead_leaves_fraction, device=device_name(self.device),
                      torch=torch.__version__, diffusers=_diffusers_version(),
                      command=" ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
                      peak_gpu_mem_mb=round(torch.cuda.max_memory_allocated(self.device) / 2**20)
                      if self.device.type == "cuda" else None,
                      held_out=metrics, history=self.history)
        write_report(self.report_folder, report)
        logger.info("[%s] done: %d steps, %d images, %.2f min; held-out %s", self.name, step, images,
                    elapsed / 60, json.dumps(metrics))
        return report

    def load_state(self, objects: dict) -> tuple[int, int, float]:
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        for key, obj in objects.items():
            obj.load_state_dict(state[key])
        self.generator.set_state(state["generator"].cpu())
        self.history = state.get("history", [])
        return state["step"], state["images"], state["elapsed"]

    def roll_back(self, objects: dict, vals: dict) -> tuple[int, int]:
        """Non-finite losses: reload the last saved (finite) state, halve the learning rate."""
        if not self.state_path.exists():
            raise FloatingPointError(f"[{self.name}] non-finite losses {vals} before any saved state; "
                                     "lower the learning rate (--lr-*) or use --precision fp32")
        step, images, _ = self.load_state(objects)
        self.lr *= 0.5
        logger.error("[%s] non-finite losses %s: rolled back to step %d, learning rate halved to %g", self.name,
                     vals, step, self.lr)
        return step, images

    def save_state(self, objects: dict, step: int, images: int, elapsed: float) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: obj.state_dict() for k, obj in objects.items()}
        state.update(step=step, images=images, elapsed=elapsed, generator=self.generator.get_state(),
                     history=self.history)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def build(self) -> dict:
        raise NotImplementedError

    def step(self, step: int, frac: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def export(self) -> dict:
        """Write the weights, set `self.report_folder`, return the held-out metrics of the artifact."""
        raise NotImplementedError


class TensorState:
    """A tensor wrapped with state_dict()/load_state_dict() for checkpointing."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def state_dict(self) -> dict:
        return {"tensor": self.tensor}

    def load_state_dict(self, state: dict) -> None:
        self.tensor.copy_(state["tensor"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def write_report(folder: Path, report: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_report.json").write_text(json.dumps(report, indent=1))
