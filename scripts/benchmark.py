"""Peak GPU memory and seconds per image of each solver at paper scale, with random-weight priors.

    PYTHONPATH=. python scripts/benchmark.py --scale full --device cuda --measure-steps 3 --measure-steps-pixel 20 \
        --out benchmark.json --markdown benchmark.md
    PYTHONPATH=. python scripts/benchmark.py --scale tiny --device cpu --measure-steps 1 --measure-steps-pixel 2 \
        --out /tmp/benchmark.json --markdown /tmp/benchmark.md   # CI smoke test

What is measured (batch 1, one image of the prior's size: 256 px at full scale):
- Priors are the real architectures built from their configs with random weights
  (scripts/bench_models.py), saved in our checkpoint layouts and loaded through the real loaders
  (VQDiffusionPrior, DDPMPrior) at each precision; time and memory do not depend on the weights.
- Solvers are built from their constructors with the hyperparameters of conf/solver/<name>.yaml
  (paper step counts: G2D2 100 steps x 30 inner iterations, star-shaped noise; DPS and RED-Diff
  1000 steps). G2D2 runs the ImageNet setting: a prompt with classifier-free guidance 5 (two
  transformer passes per step). The task is conf/task/<task>.yaml (default SR x4).
- A solve is not run to the end: a hook on the prior network marks the start of every outer step,
  `--warmup-steps` steps are discarded, the next `--measure-steps` (G2D2, ~1 s a step on a GPU) or
  `--measure-steps-pixel` (DPS, RED-Diff: tens of ms a step, so more steps against timer noise) are
  timed, then the solve is stopped. The device is synchronised only at the two edges of that window
  (the start of the first timed step and the start of the step after the last one), never in between,
  so the solver runs asynchronously as it would unobserved, exactly as the bare prior is timed
  (back-to-back calls, one synchronisation at each end). s/image = s/step x the solver's num_steps
  (extrapolated; one-off costs such as loading, prompt encoding and the final decode are not included).
- Peak GPU memory = torch.cuda.max_memory_allocated over the solve (weights included), after
  reset_peak_memory_stats; on CPU the process peak RSS is recorded instead.
- Bare prior cost per step: G2D2 = one guided transformer pass + inner_iters x relaxed-decode
  forward+backward; DPS = UNet forward + backward w.r.t. its input; RED-Diff = UNet forward; each the
  mean of `--bare-reps` back-to-back calls (pixel priors: at least `--measure-steps-pixel` calls).
  overhead = s/step / bare s/step - 1 (the solver's own work per step; target <= 10 %).
- Host syncs/step (CUDA only, a diagnostic): the synchronising CUDA calls the solver makes per timed
  step (.item(), bool(tensor), device-to-host copies, ...), counted as the warnings of
  torch.cuda.set_sync_debug_mode("warn") raised inside the timed window (the window-edge
  synchronisations excluded); each one stalls the host until the GPU catches up. None on CPU, with
  `--no-count-syncs`, or if the sync debug mode is unavailable. Emitting the warnings costs some host
  time per sync; compare with `--no-count-syncs` if the count is large.
- `--checkpointing on|both` adds rows with the priors' gradient checkpointing (precision column
  "<dtype>+ckpt"): the memory it saves and the time it costs for DPS and G2D2.
- `--profile DIR` writes, per row, a torch.profiler table of one solver step (after one warm-up step;
  sorted by device time on CUDA, CPU time otherwise) to DIR/<solver>_<prior>_<precision>.txt: where
  the time of a step goes, for the overhead column. Profiled steps are not part of the timings.
Each row records the counts it used (warmup_steps, measure_steps, steps_timed, bare_reps).
Each configuration catches its own out-of-memory / errors, and the JSON and Markdown files are
rewritten after every configuration, so an interrupted run still leaves its data.
This script needs neither Hydra nor the runner: it reads the yaml files with PyYAML.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

from g2d2.priors.base import PRECISIONS as PRIOR_PRECISIONS
from g2d2.solvers.base import NonFiniteError
from g2d2.tracking import measure_cost, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent


def _load_sibling(name: str):
    """Import scripts/<name>.py (the random-checkpoint builders) without touching sys.path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_models = _load_sibling("bench_models")

logger = logging.getLogger("benchmark")

#: solver name -> (fallback class path, noise schedule group option, prior group it runs on)
SOLVERS = {
    "g2d2": ("g2d2.solvers.g2d2.G2D2", "star", "vq"),
    "red_diff": ("g2d2.solvers.red_diff.REDDiff", "ddpm", "pixel"),
    "dps": ("g2d2.solvers.dps.DPS", "ddpm", "pixel"),
    "pinv": ("g2d2.solvers.pinv.PseudoInverse", None, None),
}
NOISE_SCHEDULES = {"star": "g2d2.noise.star.StarShaped", "ddpm": "g2d2.noise.ddpm.DDPMTimesteps"}
PRECISIONS = tuple(PRIOR_PRECISIONS)


class StopSolve(Exception):
    """Raised by the step clock once enough steps are timed."""


# ----------------------------------------------------------------- building from the yaml files
def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _build(conf_file: Path, fallback_target: str, **extra):
    """Instantiate `_target_` of a yaml (plain PyYAML: interpolations are skipped, constructor defaults
    apply) with `extra` keyword arguments; the fallback class with defaults when the yaml is missing."""
    target, kwargs = fallback_target, {}
    if conf_file.is_file():
        cfg = yaml.safe_load(conf_file.read_text()) or {}
        target = cfg.pop("_target_", fallback_target)
        cfg.pop("defaults", None)
        kwargs = {k: v for k, v in cfg.items() if not (isinstance(v, str) and "${" in v)}
    cls = _import(target)
    accepted = inspect.signature(cls).parameters
    dropped = sorted(set(kwargs) - set(accepted))
    if dropped:
        logger.warning("%s: keys %s are not arguments of %s; ignored", conf_file, dropped, target)
    return cls(**{k: v for k, v in {**kwargs, **extra}.items() if k in accepted})


def make_solver(name: str):
    target, schedule, _ = SOLVERS[name]
    noise = None
    if schedule is not None:
        noise = _build(ROOT / "conf" / "noise_schedule" / f"{schedule}.yaml", NOISE_SCHEDULES[schedule])
    return _build(ROOT / "conf" / "solver" / f"{name}.yaml", target, noise_schedule=noise)


def make_operator(task: str, image_size: int, device: torch.device):
    """(operator on device, sigma) of conf/task/<task>.yaml at `image_size`."""
    cfg = yaml.safe_load((ROOT / "conf" / "task" / f"{task}.yaml").read_text())
    op_cfg = dict(cfg["operator"])
    cls = _import(op_cfg.pop("_target_"))
    op_cfg = {k: v for k, v in op_cfg.items() if not (isinstance(v, str) and "${" in v)}
    op = cls(**{**op_cfg, "image_size": image_size, "generator": torch.Generator().manual_seed(0)})
    return op.to(device), float(cfg.get("sigma", 0.05))


# ----------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, device: torch.device) -> float:
    """Mean seconds of fn() over `reps` calls, after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def _is_sync_warning(w: warnings.WarningMessage) -> bool:
    """A warning of torch.cuda.set_sync_debug_mode("warn"): "called a synchronizing CUDA operation"."""
    return "synchroniz" in str(w.message).lower()


def _replay(log: list) -> None:
    """Re-emit, once each, the warnings other than sync warnings that recording swallowed."""
    seen = set()
    for w in log:
        key = (w.category, str(w.message), w.filename, w.lineno)
        if not _is_sync_warning(w) and key not in seen:
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


@contextlib.contextmanager
def host_sync_log(device: torch.device, enabled: bool = True):
    """Record the warnings of the block with torch.cuda's sync debug mode at "warn": yields the list the
    warnings go to, or None (not CUDA, not enabled, or the sync debug mode failed: the count is then None).
    The previous sync debug mode is restored at exit."""
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
    start of step 0 (stamped without synchronisation)."""

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
            _sync(self.device)
            self.start = (time.perf_counter(), self._logged())
        elif self.calls == 0:
            self.first = (time.perf_counter(), self._logged())
        self.calls += 1

    def close(self) -> None:
        """Window end: count the syncs, then synchronise and stamp (once; the hook or the end of the solve)."""
        if self.end is None:
            logged = self._logged()
            _sync(self.device)
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
            syncs = sum(map(_is_sync_warning, self.log[origin[1]:self.end[1]])) / steps
        out = {"s_per_step": (self.end[0] - origin[0]) / steps, "steps_timed": steps, "host_syncs_per_step": syncs}
        return {**out, "note": note} if note else out


def measure_solve(solver, prior, network, operator, y, device, warmup: int, measure: int, seed: int = 0,
                  count_syncs: bool = True) -> dict:
    """Run solver.solve until warmup + measure steps are timed: per-step seconds, host syncs and peak memory."""
    clock = StepClock(device, warmup, measure)
    handle = network.register_forward_pre_hook(clock)
    note = None
    try:
        with measure_cost(device) as cost, host_sync_log(device, count_syncs) as log:
            clock.log = log
            try:
                solver.solve(prior, operator, y, generator=torch.Generator().manual_seed(seed))
                clock.close()  # fewer steps than asked for: the end of the solve closes the last step
            except StopSolve:
                pass
            except NonFiniteError as err:  # random weights may diverge: keep the steps timed before
                clock.close()
                note = f"stopped early: {err}"
    finally:
        handle.remove()
    out = {**clock.result(), "peak_gpu_mib": cost.peak_gpu_mem_mb}
    if note:
        out["note"] = f"{note}; {out['note']}" if out.get("note") else note
    return out


def bare_prior_cost(name: str, solver, prior, device: torch.device, reps: int) -> dict:
    """Seconds per step of the prior network alone, as the solver uses it (see module docstring)."""
    with measure_cost(device) as cost:
        if name == "g2d2":
            tokens = torch.full((1, prior.num_tokens), prior.mask_id, dtype=torch.long, device=device)
            t_net = timed(lambda: prior.log_p_x0(tokens, prior.num_timesteps - 1), reps, device)
            logits = torch.randn(1, prior.num_codes, prior.num_tokens, device=device, requires_grad=True)

            def decode_fwd_bwd() -> None:
                prior.decode(torch.softmax(logits, dim=1)).sum().backward()
                logits.grad = None

            t_dec = timed(decode_fwd_bwd, reps, device)
            out = {"transformer_s": t_net, "decode_fwd_bwd_s": t_dec}
            out["bare_s_per_step"] = t_net + solver.inner_iters * t_dec
        else:
            x = torch.randn(1, 3, prior.image_size, prior.image_size, device=device)
            t = prior.num_train_timesteps // 2
            if name == "dps":  # DPS differentiates through the network w.r.t. its input
                x.requires_grad_(True)
                out = {"bare_s_per_step": timed(lambda: torch.autograd.grad(prior.eps(x, t).sum(), x), reps, device)}
            else:
                with torch.no_grad():
                    out = {"bare_s_per_step": timed(lambda: prior.eps(x, t), reps, device)}
    out["bare_peak_gpu_mib"] = cost.peak_gpu_mem_mb
    return out


# ----------------------------------------------------------------- one configuration
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure(err: BaseException, where: str) -> dict:
    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
    return {"status": "oom" if oom else "error", "error": f"{where}{type(err).__name__}: {str(err)[:300]}"}


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
            raise StopSolve
        self.calls += 1

    def stop(self) -> None:
        """Stop the profiler if it runs (a profiler left on would slow every later row's timing)."""
        if self.running:
            self.profiler.stop()
            self.running = False


def profile_step(solver, prior, network, operator, y, device: torch.device, path: Path, seed: int = 0) -> None:
    """Write a torch.profiler table of one solver step (after one warm-up step) to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    profiler = profile(activities=activities)
    hook = ProfileSteps(profiler)
    handle = network.register_forward_pre_hook(hook)
    try:
        solver.solve(prior, operator, y, generator=torch.Generator().manual_seed(seed))
    except StopSolve:
        pass
    finally:
        handle.remove()
        hook.stop()  # the solve ended (or failed) inside the profiled step
    if hook.calls <= hook.warmup:
        path.write_text("solve ended before a step could be profiled\n")
        return
    _sync(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=40)
    path.write_text(f"one solver step on {device}, sorted by {sort}\n\n{table}\n")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.split(":")[0].strip()).strip("_")


def step_counts(name: str, args) -> dict:
    """The counts a solver's row is timed with: warm-up and timed outer steps, bare prior repetitions.

    Pixel solvers (steps of tens of ms) are timed over --measure-steps-pixel steps and their bare prior over at
    least as many calls; G2D2 over --measure-steps. pinv is one call per solve, timed over --bare-reps calls
    after one warm-up call."""
    if SOLVERS[name][2] is None:
        return {"warmup_steps": 1, "measure_steps": args.bare_reps, "bare_reps": None}
    if SOLVERS[name][2] == "pixel":
        measure = args.measure_steps_pixel
        return {"warmup_steps": args.warmup_steps, "measure_steps": measure, "bare_reps": max(args.bare_reps, measure)}
    return {"warmup_steps": args.warmup_steps, "measure_steps": args.measure_steps, "bare_reps": args.bare_reps}


def run_solver(name: str, prior, network, shape: str, precision: str, args, device: torch.device) -> dict:
    """One row: build the solver and the task, time the solve, then the bare prior; failures recorded."""
    counts = step_counts(name, args)
    row = {"solver": name, "prior": shape, "precision": precision, "status": "ok", **counts}
    try:
        solver = make_solver(name)
        image_size = prior.image_size if prior is not None else args.pinv_size
        operator, sigma = make_operator(args.task, image_size, device)
        gen = torch.Generator().manual_seed(args.seed)
        x = (torch.rand(1, *operator.image_shape, generator=gen) * 2 - 1).to(device)  # content does not matter
        y = operator.measure(x, sigma, gen)
        num_steps = int(getattr(solver, "num_steps", 1))
        row.update(num_steps=num_steps, inner_iters=getattr(solver, "inner_iters", None), task=args.task)
        if prior is None:  # pinv: one call is the whole solve
            with measure_cost(device) as cost:
                row["s_per_step"] = timed(lambda: solver.solve(None, operator, y, gen), args.bare_reps, device)
            row.update(peak_gpu_mib=cost.peak_gpu_mem_mb, steps_timed=args.bare_reps, host_syncs_per_step=None)
        else:
            row.update(measure_solve(solver, prior, network, operator, y, device, counts["warmup_steps"],
                                     counts["measure_steps"], args.seed, args.count_syncs))
        row["s_per_image"] = row["s_per_step"] * num_steps
    except Exception as err:  # noqa: BLE001 - one configuration failing must not stop the benchmark
        row.update(_failure(err, ""))
    _free(device)
    if row["status"] == "ok" and prior is not None:
        try:
            row.update(bare_prior_cost(name, solver, prior, device, counts["bare_reps"]))
            row["overhead"] = row["s_per_step"] / row["bare_s_per_step"] - 1.0
        except Exception as err:  # noqa: BLE001 - keep the solver's numbers
            row["bare_error"] = _failure(err, "bare prior: ")["error"]
        _free(device)
    if row["status"] == "ok" and prior is not None and args.profile:
        path = Path(args.profile) / f"{name}_{_slug(shape)}_{precision}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            profile_step(solver, prior, network, operator, y, device, path, args.seed)
            row["profile"] = str(path)
        except Exception as err:  # noqa: BLE001 - a diagnostic: keep the row
            row["profile_error"] = _failure(err, "profile: ")["error"]
        _free(device)
    if row["status"] != "ok":
        logger.warning("%s / %s / %s: %s", name, shape, precision, row["error"])
    row["peak_rss_mib"] = peak_rss_mb()
    return row


def load_prior(group: str, folder: Path, precision: str, device: torch.device, args, checkpointing: bool = False):
    """(prior, network whose calls mark solver steps) loaded through the real loaders."""
    kw = {"device": device, "precision": precision, "gradient_checkpointing": checkpointing}
    if group == "vq":
        from g2d2.priors.discrete import VQDiffusionPrior

        prior = VQDiffusionPrior(str(folder), prompt=args.prompt, guidance_scale=args.guidance, **kw)
        return prior, prior.transformer
    from g2d2.priors.pixel import DDPMPrior

    prior = DDPMPrior(str(folder), **kw)
    return prior, prior.unet


def run_group(group: str, name: str, solvers: list[str], workdir: Path, args, device, add, over_budget) -> None:
    """Build one random checkpoint, then load it at every precision and run every solver on it."""
    folder = workdir / name
    save_dtype = torch.float16 if device.type == "cuda" else torch.float32  # halves the bytes written and read
    t0 = time.perf_counter()
    info = None
    for build_device in dict.fromkeys([device, torch.device("cpu")]):  # random init on the GPU; the CPU if that fails
        try:
            if group == "vq":
                info = bench_models.write_vq_diffusion(folder, args.scale, build_device, save_dtype)
            else:
                info = bench_models.write_adm(folder, name, args.scale, build_device, save_dtype)
            break
        except Exception as err:  # noqa: BLE001
            logger.warning("building the %s checkpoint on %s failed: %s", name, build_device, err)
            failure = _failure(err, "build: ")
        finally:
            _free(device)
    if info is None:
        for s in solvers:
            add({"solver": s, "prior": name, "precision": "-", **failure})
        return
    build_s = time.perf_counter() - t0
    for prec, ckpt in ((p, c) for p in args.precisions for c in args.checkpointing):
        label = f"{prec}+ckpt" if ckpt else prec
        if over_budget():
            for s in solvers:
                add({"solver": s, "prior": info["shape"], "precision": label, "status": "skipped", "error": "budget"})
            continue
        t0 = time.perf_counter()
        try:
            prior, network = load_prior(group, folder, prec, device, args, ckpt)
        except Exception as err:  # noqa: BLE001
            for s in solvers:
                add({"solver": s, "prior": info["shape"], "precision": label, **_failure(err, "load: ")})
            _free(device)
            continue
        extra = {"params": info["params"], "build_s": build_s, "load_s": time.perf_counter() - t0}
        extra["weights_gpu_mib"] = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        for s in solvers:
            add({**run_solver(s, prior, network, info["shape"], label, args, device), **extra, "checkpointing": ckpt})
        del prior, network
        _free(device)
    shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------- output
def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _sec(v) -> str:
    """Seconds with 3-4 significant digits and no exponent above 1 s."""
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.0f}" if v >= 1000 else f"{v:.4g}"


def ratio_lines(rows: list[dict]) -> list[str]:
    """G2D2 peak memory / DPS peak memory, per precision and DPS prior."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("peak_gpu_mib")]
    lines = []
    for g in (r for r in ok if r["solver"] == "g2d2"):
        for d in (r for r in ok if r["solver"] == "dps" and r["precision"] == g["precision"]):
            ratio = g["peak_gpu_mib"] / d["peak_gpu_mib"]
            lines.append(
                f"G2D2 / DPS peak GPU memory ({g['precision']}, DPS on {d['prior'].split(':')[0]}): "
                f"{g['peak_gpu_mib']:.0f} / {d['peak_gpu_mib']:.0f} MiB = {ratio:.2f}"
            )
    return lines


def write_outputs(result: dict, args) -> None:
    """Rewrite the JSON (atomically) and the Markdown table with every row so far."""
    result["ratios"] = ratio_lines(result["rows"])
    out = Path(args.out)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    meta = result["meta"]
    lines = [
        f"# Solver cost benchmark ({meta['scale']} scale)",
        "",
        f"Device: {meta['device_name']} | torch {meta['torch']} | diffusers {meta['diffusers']} | "
        f"transformers {meta['transformers']} | task {meta['task']} | batch 1 | random weights | "
        f"TF32 matmul {meta['tf32_matmul']}, cuDNN {meta['tf32_cudnn']}",
        "",
        f"Timed {meta['measure_steps']} outer steps (G2D2) or {meta.get('measure_steps_pixel', '-')} (DPS, RED-Diff) "
        f"after {meta['warmup_steps']} warm-up, the device synchronised only at the two edges of the timed window "
        "(the solver runs asynchronously in between, as the bare prior does); s/image = s/step x steps "
        "(extrapolated; loading, prompt encoding and the final decode excluded). Peak = "
        "torch.cuda.max_memory_allocated over the solve, weights included. Bare prior: G2D2 = guided transformer "
        "pass + inner iters x relaxed decode fwd+bwd; DPS = UNet fwd+bwd w.r.t. x; RED-Diff = UNet fwd; mean of "
        f"{meta['bare_reps']} back-to-back calls (pixel priors: at least as many as their timed steps). "
        "overhead = s/step / bare prior s/step - 1. Host syncs/step: synchronising CUDA calls per timed step "
        "(torch.cuda.set_sync_debug_mode warnings in the timed window; CUDA only). "
        "Timed: outer steps timed (pinv: calls).",
        "",
        "| solver | prior shape | precision | peak GPU MiB | s/step | steps | timed | s/image (extrap.) "
        "| bare prior s/step | overhead | host syncs/step | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        steps = r.get("num_steps", "-")
        if r.get("inner_iters"):
            steps = f"{steps} x {r['inner_iters']}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:100]}"
        if r.get("note") or r.get("bare_error"):
            status += f" ({r.get('note') or r.get('bare_error')})"
        overhead = None if r.get("overhead") is None else 100 * r["overhead"]
        lines.append(
            f"| {r['solver']} | {r['prior']} | {r['precision']} | {_fmt(r.get('peak_gpu_mib'), '.0f')} "
            f"| {_sec(r.get('s_per_step'))} | {steps} | {r.get('steps_timed', '-')} | {_sec(r.get('s_per_image'))} "
            f"| {_sec(r.get('bare_s_per_step'))} | {_fmt(overhead, '+.1f')}{'' if overhead is None else ' %'} "
            f"| {_fmt(r.get('host_syncs_per_step'), '.4g')} | {status} |"
        )
    notes = list(result["ratios"])
    for r in result["rows"]:
        if r["solver"] == "g2d2" and "transformer_s" in r:
            notes.append(
                f"G2D2 bare prior ({r['precision']}): guided transformer {_sec(r['transformer_s'])} s + "
                f"{r['inner_iters']} x relaxed decode fwd+bwd {_sec(r['decode_fwd_bwd_s'])} s per step"
            )
    lines += [""] + [f"- {line}" for line in notes]
    Path(args.markdown).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------- main
def _workdir(args, needed_gib: float) -> Path:
    """A temporary folder for the random checkpoints: /dev/shm (RAM) when it has room, else the temp dir."""
    if args.workdir:
        base = Path(args.workdir)
    else:
        shm = Path("/dev/shm")
        room = shm.is_dir() and shutil.disk_usage(shm).free > (needed_gib + 2) * 2**30
        base = shm if room else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="g2d2_bench_", dir=base))


def _split(text: str, known, what: str, parser: argparse.ArgumentParser) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in known]
    if bad:
        parser.error(f"unknown {what} {bad}; choose from {list(known)}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=("full", "tiny"), default="full", help="full: real shapes, 256 px; tiny: smoke")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--solvers", default="g2d2,red_diff,dps,pinv", help=f"comma list of {list(SOLVERS)}")
    p.add_argument("--precisions", default="fp32,fp16",
                   help=f"comma list of {tuple(PRECISIONS)}: weight dtype; amp_* = fp32 weights under autocast")
    p.add_argument("--pixel-priors", default="adm_ffhq,adm_imagenet", help="comma list of adm_ffhq, adm_imagenet")
    p.add_argument("--task", default="sr4", help="conf/task/<task>.yaml")
    p.add_argument("--measure-steps", type=int, default=5, help="outer steps timed for G2D2")
    p.add_argument("--measure-steps-pixel", type=int, default=20, help="outer steps timed for the pixel solvers "
                   "(DPS, RED-Diff: short steps, so more of them)")
    p.add_argument("--warmup-steps", type=int, default=1, help="outer steps run before timing")
    p.add_argument("--bare-reps", type=int, default=None, help="repetitions of each bare prior measurement "
                   "(default 5 at full scale, 2 at tiny; pixel priors: at least --measure-steps-pixel)")
    p.add_argument("--no-count-syncs", dest="count_syncs", action="store_false", help="do not count host syncs "
                   "(CUDA sync debug mode) during the timed window")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 at tiny scale, "
                   "which avoids oversubscription on a shared CI machine)")
    p.add_argument("--prompt", default="a photo of a tench", help="G2D2 prompt (ImageNet setting)")
    p.add_argument("--guidance", type=float, default=5.0, help="G2D2 classifier-free guidance (ImageNet: 5)")
    p.add_argument("--budget-s", type=float, default=None, help="skip configurations starting after this many s")
    p.add_argument("--workdir", default=None, help="where random checkpoints go (default /dev/shm if room)")
    p.add_argument("--checkpointing", choices=("off", "on", "both"), default="off",
                   help="rows with the priors' gradient checkpointing off, on, or both")
    p.add_argument("--profile", default=None, help="folder for one profiled solver step per row (torch.profiler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmark.json")
    p.add_argument("--markdown", default="benchmark.md")
    args = p.parse_args(argv)
    if not (ROOT / "conf" / "task" / f"{args.task}.yaml").is_file():
        p.error(f"no task config conf/task/{args.task}.yaml; choose from "
                f"{sorted(f.stem for f in (ROOT / 'conf' / 'task').glob('*.yaml'))}")
    args.solvers = _split(args.solvers, SOLVERS, "solver(s)", p)
    args.precisions = _split(args.precisions, PRECISIONS, "precision(s)", p)
    args.pixel_priors = _split(args.pixel_priors, bench_models.ADM_SHAPES, "pixel prior(s)", p)
    args.checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    if args.bare_reps is None:
        args.bare_reps = 5 if args.scale == "full" else 2
    if args.threads is None and args.scale == "tiny":
        args.threads = 1
    if min(args.measure_steps, args.measure_steps_pixel, args.bare_reps) < 1 or args.warmup_steps < 0:
        p.error("--measure-steps, --measure-steps-pixel and --bare-reps must be >= 1, --warmup-steps >= 0")
    args.pinv_size = 256 if args.scale == "full" else bench_models.TINY_IMAGE_SIZE
    return args


def _meta(args, device: torch.device) -> dict:
    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "scale": args.scale, "task": args.task, "batch": 1, "precisions": args.precisions,
        "measure_steps": args.measure_steps, "measure_steps_pixel": args.measure_steps_pixel,
        "warmup_steps": args.warmup_steps, "bare_reps": args.bare_reps, "count_syncs": args.count_syncs,
        "sync_rule": "device synchronised only at the timed window's edges",
        "checkpointing": args.checkpointing, "profile": args.profile,
        "prompt": args.prompt, "guidance": args.guidance,
    }


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    result = {"meta": _meta(args, device), "rows": []}

    def add(row: dict) -> None:
        row["elapsed_s"] = time.perf_counter() - start
        result["rows"].append(row)
        write_outputs(result, args)  # after every configuration: a killed run still leaves its data
        logger.info("%s", {k: v for k, v in row.items() if k != "prior"})

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    if "pinv" in args.solvers:
        add(run_solver("pinv", None, None, "none", "fp32", args, device))
    # G2D2 first (the number the comparison is about), then the pixel solvers per ADM shape
    groups = [("vq", "vq", ["g2d2"])] if "g2d2" in args.solvers else []
    pixel = [s for s in args.solvers if SOLVERS[s][2] == "pixel"]
    groups += [("pixel", name, pixel) for name in args.pixel_priors] if pixel else []
    workdir = _workdir(args, needed_gib=4.0 if args.scale == "full" else 0.1)
    try:
        for group, name, solvers in groups:
            if over_budget():
                for s in solvers:
                    for prec in args.precisions:
                        add({"solver": s, "prior": name, "precision": prec, "status": "skipped", "error": "budget"})
                continue
            run_group(group, name, solvers, workdir, args, device, add, over_budget)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["meta"]["total_s"] = time.perf_counter() - start
    write_outputs(result, args)
    return result


if __name__ == "__main__":
    main()
