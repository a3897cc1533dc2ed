"""One benchmark row = one `python scripts/run.py <overrides>` configuration, timed for a few steps.

Each row composes conf/config.yaml with the overrides run.py would get (the method of the solver on that
prior shape, the task, the prior's path pointing at the random checkpoint, precision, gradient
checkpointing, device, image size, batch size, plus the user's own) and builds solver, prior and operator with the
runner's builders: the benchmark times exactly what run.py runs, the method's noise schedule, per-task
settings and interpolations included.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from g2d2.bench import models, timing
from g2d2.bench.profiling import profile_step
from g2d2.experiment.cli import CONF_DIR
from g2d2.experiment.runner import (
    build_prior,
    build_solver,
    check_config,
    check_prior,
    pose_batch,
)
from g2d2.experiment.tracking import measure_cost, peak_rss_mb
from g2d2.operators.base import per_image
from g2d2.priors.base import DiscretePrior

logger = logging.getLogger(__name__)

#: solver (conf/solver/<name>.yaml) -> the kind of random prior its rows run on (None: no prior)
SOLVERS = {"g2d2": "vq", "red_diff": "pixel", "dps": "pixel", "pinv": None}
#: conf/prior option whose shapes the random VQ checkpoint has (the pixel ones: models.ADM_SHAPES' names)
VQ_PRIOR = "vq_diffusion_ithq"
#: the discrete (token) priors G2D2 rows can run on: VQ-Diffusion ITHQ and the aMUSEd shapes (models.AMUSED_SHAPES)
DISCRETE_PRIORS = (VQ_PRIOR, *models.AMUSED_SHAPES)
#: (solver, conf/prior option of the random checkpoint's shapes) -> the conf/method option a row runs.
#: G2D2 runs the ImageNet method (guidance 5: two transformer passes per step), with one prompt for every
#: image instead of the data's class prompts (--prompt, --guidance)
METHODS = {
    ("g2d2", VQ_PRIOR): "g2d2_imagenet",
    ("g2d2", "amused_256"): "g2d2_amused_imagenet",
    ("g2d2", "amused_512"): "g2d2_amused_imagenet",
    ("red_diff", "adm_ffhq"): "red_diff_ffhq",
    ("red_diff", "adm_imagenet"): "red_diff_imagenet",
    ("dps", "adm_ffhq"): "dps_ffhq",
    ("dps", "adm_imagenet"): "dps_imagenet",
    ("pinv", None): "pinv",
}
#: row overrides a prior shape needs beyond its method's (amused_512 has no method: g2d2_amused_imagenet's on it)
PRIOR_OVERRIDES = {"amused_512": ["prior=amused_512"]}


def quoted(value: str) -> str:
    """`value` as a Hydra override value: quoted, so spaces, commas and `=` stay literal."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both quote characters; Hydra overrides cannot take it here")


def method_override(name: str) -> str:
    """`method=<name>` when conf/config.yaml's defaults list chooses a method, else `+method=<name>` (Hydra refuses
    to override a group the defaults list lacks, and to add one it has)."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults") or []
    listed = any(isinstance(entry, DictConfig) and "method" in entry for entry in defaults)
    return f"{'' if listed else '+'}method={name}"


def row_overrides(
    method: str, checkpoint: Path | None, image_size: int, precision: str, checkpointing: bool, args,
    prompt: bool = False, extra: list[str] | tuple[str, ...] = (), batch_size: int = 1,
) -> list[str]:
    """The run.py overrides of one row of conf/method/<method>.yaml; `checkpoint` replaces the prior's path
    (None keeps the yaml's); `prompt`: the prior is text-conditioned, prompted with args.prompt / args.guidance;
    `extra`: overrides right after the method's (e.g. another prior choice); `batch_size`: run.py's."""
    overrides = [
        method_override(method), *extra, f"task={args.task}", f"data.image_size={image_size}", f"precision={precision}",
        f"gradient_checkpointing={str(checkpointing).lower()}", f"device={args.device}", f"seed={args.seed}",
        f"batch_size={batch_size}",
    ]
    if checkpoint is not None:
        overrides.append(f"prior.path={quoted(str(checkpoint))}")
    if prompt:
        overrides += [
            "prior.prompt_from_data=false", f"prior.prompt={quoted(args.prompt)}",
            f"prior.guidance_scale={args.guidance}",
        ]
    return overrides + list(args.overrides)


def compose_run_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml composed with `overrides`, as `python scripts/run.py <overrides>` composes it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    check_config(cfg)
    return cfg


def row_config(cfg: DictConfig) -> dict:
    """The resolved solver, noise_schedule and prior configs and the batch size a row was built from (in the JSON)."""
    out = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else None
        for key in ("solver", "noise_schedule", "prior")
    }
    return {**out, "batch_size": cfg.batch_size}


def prior_key(cfg: DictConfig) -> str:
    """What decides the loaded prior: rows with the same key share one load."""
    return json.dumps([row_config(cfg)["prior"], cfg.precision, cfg.gradient_checkpointing, cfg.device])


def step_network(prior: torch.nn.Module) -> torch.nn.Module:
    """The network a solver calls once per outer step: its calls mark the steps."""
    return prior.transformer if isinstance(prior, DiscretePrior) else prior.unet


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure(err: BaseException, where: str) -> dict:
    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
    return {"status": "oom" if oom else "error", "error": f"{where}{type(err).__name__}: {str(err)[:300]}"}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.split(":")[0].strip()).strip("_")


def step_counts(name: str, args) -> dict:
    """The counts a solver's row is timed with: warm-up and timed outer steps, bare prior repetitions.

    Pixel solvers (steps of tens of ms) are timed over --measure-steps-pixel steps and their bare prior over at
    least as many calls; G2D2 over --measure-steps. pinv is one call per solve, timed over --bare-reps calls
    after one warm-up call."""
    if SOLVERS[name] is None:
        return {"warmup_steps": 1, "measure_steps": args.bare_reps, "bare_reps": None}
    if SOLVERS[name] == "pixel":
        measure = args.measure_steps_pixel
        return {"warmup_steps": args.warmup_steps, "measure_steps": measure, "bare_reps": max(args.bare_reps, measure)}
    return {"warmup_steps": args.warmup_steps, "measure_steps": args.measure_steps, "bare_reps": args.bare_reps}


def throughput(s_per_step: float, num_steps: int, batch_size: int) -> dict:
    """Seconds of one solve of `batch_size` images at `num_steps` steps (extrapolated from s/step), per image,
    and images per hour."""
    s_per_solve = s_per_step * num_steps
    s_per_image = s_per_solve / batch_size
    return {"s_per_solve": s_per_solve, "s_per_image": s_per_image, "images_per_hour": 3600.0 / s_per_image}


def pose_problem(cfg: DictConfig, device: torch.device) -> tuple:
    """(operator, generators, y) of one batch of `python scripts/run.py <overrides>`: images 0 .. cfg.batch_size-1,
    posed by the runner's own `pose_batch`, with the per-image generators the runner then passes the solver.
    Random images stand in for the data: their content does not change the cost."""
    size = cfg.data.image_size
    x = (torch.rand(cfg.batch_size, 3, size, size, generator=torch.Generator().manual_seed(cfg.seed)) * 2 - 1)
    operators, generators, y = pose_batch(cfg, x.to(device), list(range(cfg.batch_size)), device)
    return per_image(operators), generators, y


def bare_prior_cost(name: str, solver, prior, device: torch.device, reps: int, batch_size: int = 1) -> dict:
    """Seconds per step of the prior network alone, as the solver uses it, on a batch of `batch_size`.

    G2D2 = one guided transformer pass + inner_iters x relaxed-decode forward+backward; DPS = UNet forward +
    backward w.r.t. its input; RED-Diff = UNet forward; each the mean of `reps` back-to-back calls.
    """
    b = batch_size
    with measure_cost(device) as cost:
        if name == "g2d2":
            tokens = torch.full((b, prior.num_tokens), prior.mask_id, dtype=torch.long, device=device)
            t_net = timing.timed(lambda: prior.log_p_x0(tokens, prior.num_timesteps - 1), reps, device)
            logits = torch.randn(b, prior.num_codes, prior.num_tokens, device=device, requires_grad=True)

            def decode_fwd_bwd() -> None:
                prior.decode(torch.softmax(logits, dim=1)).sum().backward()
                logits.grad = None

            t_dec = timing.timed(decode_fwd_bwd, reps, device)
            out = {"transformer_s": t_net, "decode_fwd_bwd_s": t_dec}
            out["bare_s_per_step"] = t_net + solver.inner_iters * t_dec
        else:
            x = torch.randn(b, 3, prior.image_size, prior.image_size, device=device)
            t = prior.num_train_timesteps // 2
            if name == "dps":  # DPS differentiates through the network w.r.t. its input
                x.requires_grad_(True)
                grad = lambda: torch.autograd.grad(prior.eps(x, t).sum(), x)  # noqa: E731
                out = {"bare_s_per_step": timing.timed(grad, reps, device)}
            else:
                with torch.no_grad():
                    out = {"bare_s_per_step": timing.timed(lambda: prior.eps(x, t), reps, device)}
    out["bare_peak_gpu_mib"] = cost.peak_gpu_mem_mb
    return out


def run_solver(name: str, cfg: DictConfig, prior, shape: str, precision: str, args, device: torch.device) -> dict:
    """One row: build the solver and the task from `cfg`, time the solve, then the bare prior; failures recorded.

    `prior` is the one the runner's build_prior made from this cfg (None for pinv); the solve is one batch of
    cfg.batch_size images."""
    counts = step_counts(name, args)
    batch = cfg.batch_size
    row = {"solver": name, "prior": shape, "precision": precision, "batch_size": batch, "status": "ok", **counts}
    try:
        solver = build_solver(cfg)
        check_prior(solver, prior, cfg.data.image_size)
        operator, generators, y = pose_problem(cfg, device)
        num_steps = int(getattr(solver, "num_steps", 1))
        row.update(num_steps=num_steps, inner_iters=getattr(solver, "inner_iters", None), task=args.task)
        if prior is None:  # pinv: one call is the whole solve
            with measure_cost(device) as cost:
                row["s_per_step"] = timing.timed(lambda: solver.solve(None, operator, y, generators), args.bare_reps,
                                                 device)
            row.update(peak_gpu_mib=cost.peak_gpu_mem_mb, steps_timed=args.bare_reps, host_syncs_per_step=None)
        else:
            network = step_network(prior)
            row.update(timing.measure_solve(solver, prior, network, operator, y, device, counts["warmup_steps"],
                                            counts["measure_steps"], generators, args.count_syncs))
        row.update(throughput(row["s_per_step"], num_steps, batch))
    except Exception as err:  # noqa: BLE001 - one configuration failing must not stop the benchmark
        row.update(failure(err, ""))
    free(device)
    if row["status"] == "ok" and prior is not None:
        try:
            row.update(bare_prior_cost(name, solver, prior, device, counts["bare_reps"], batch))
            row["overhead"] = row["s_per_step"] / row["bare_s_per_step"] - 1.0
        except Exception as err:  # noqa: BLE001 - keep the solver's numbers
            row["bare_error"] = failure(err, "bare prior: ")["error"]
        free(device)
    if row["status"] == "ok" and prior is not None and args.profile:
        path = Path(args.profile) / f"{name}_{_slug(shape)}_{precision}{'' if batch == 1 else f'_b{batch}'}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            profile_step(solver, prior, step_network(prior), operator, y, device, path, generators)
            row["profile"] = str(path)
        except Exception as err:  # noqa: BLE001 - a diagnostic: keep the row
            row["profile_error"] = failure(err, "profile: ")["error"]
        free(device)
    if row["status"] != "ok":
        logger.warning("%s / %s / %s / batch %d: %s", name, shape, precision, batch, row["error"])
    row["peak_rss_mib"] = peak_rss_mb()
    return row


def pinv_row(args, device: torch.device, batch_size: int = 1) -> dict:
    """The pseudo-inverse row (no prior) at args.pinv_size, `batch_size` images per call."""
    overrides = row_overrides(METHODS["pinv", None], None, args.pinv_size, "fp32", False, args, batch_size=batch_size)
    try:
        cfg = compose_run_config(overrides)
    except Exception as err:  # noqa: BLE001
        head = {"solver": "pinv", "prior": "none", "precision": "fp32", "batch_size": batch_size}
        return {**head, "overrides": overrides, **failure(err, "config: ")}
    row = run_solver("pinv", cfg, None, "none", "fp32", args, device)
    return {**row, "overrides": overrides, "config": row_config(cfg)}


def _write_checkpoint(prior: str, folder: Path, scale: str, device: torch.device) -> dict:
    """The random checkpoint of conf/prior/<prior>.yaml's shapes, built on `device` (or the CPU if that fails)."""
    save_dtype = torch.float16 if device.type == "cuda" else torch.float32  # halves the bytes written and read
    error = None
    for build_device in dict.fromkeys([device, torch.device("cpu")]):  # random init on the GPU; the CPU if that fails
        try:
            if prior == VQ_PRIOR:
                return models.write_vq_diffusion(folder, scale, build_device, save_dtype)
            if prior in models.AMUSED_SHAPES:
                return models.write_amused(folder, prior, scale, build_device, save_dtype)
            return models.write_adm(folder, prior, scale, build_device, save_dtype)
        except Exception as err:  # noqa: BLE001
            logger.warning("building the %s checkpoint on %s failed: %s", prior, build_device, err)
            error = err
        finally:
            free(device)
    raise error


def run_group(
    prior: str, solvers: list[str], workdir: Path, args, device: torch.device, add: Callable[[dict], None],
    over_budget: Callable[[], bool],
) -> None:
    """Build one random checkpoint of conf/prior/<prior>.yaml's shapes, then run every solver on it at every
    precision (and gradient checkpointing choice) and batch size; rows with the same prior config share one load.
    A solver that runs out of memory at one batch size skips its larger ones at that precision."""
    folder = workdir / prior
    t0 = time.perf_counter()
    try:
        info = _write_checkpoint(prior, folder, args.scale, device)
    except Exception as err:  # noqa: BLE001
        for s in solvers:
            add({"solver": s, "prior": prior, "precision": "-", **failure(err, "build: ")})
        return
    build_s = time.perf_counter() - t0
    for prec, ckpt in ((p, c) for p in args.precisions for c in args.checkpointing):
        label = f"{prec}+ckpt" if ckpt else prec
        loaded_key, loaded, load_error, extra, oom_at = None, None, None, {}, {}
        for s, b in ((s, b) for s in solvers for b in args.batch_sizes):
            head = {"solver": s, "prior": info["shape"], "precision": label, "batch_size": b}
            if over_budget() or s in oom_at:
                reason = f"out of memory at batch {oom_at[s]}" if s in oom_at else "budget"
                add({**head, "status": "skipped", "error": reason})
                continue
            overrides = row_overrides(METHODS[s, prior], folder, info["image_size"], prec, ckpt, args,
                                      SOLVERS[s] == "vq", PRIOR_OVERRIDES.get(prior, ()), batch_size=b)
            head["overrides"] = overrides
            try:
                cfg = compose_run_config(overrides)
            except Exception as err:  # noqa: BLE001
                add({**head, **failure(err, "config: ")})
                continue
            key = prior_key(cfg)
            if key != loaded_key:  # the first row, or a row whose overrides change the prior
                loaded = None
                free(device)
                loaded_key, load_error, t0 = key, None, time.perf_counter()
                try:
                    loaded = build_prior(cfg, device)
                except Exception as err:  # noqa: BLE001
                    load_error = failure(err, "load: ")
                extra = {"params": info["params"], "build_s": build_s, "load_s": time.perf_counter() - t0}
                extra["weights_gpu_mib"] = (
                    torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
                )
            if load_error is not None:
                add({**head, **load_error})
                continue
            row = run_solver(s, cfg, loaded, info["shape"], label, args, device)
            if row["status"] == "oom":
                oom_at[s] = b
            add({**row, **extra, "checkpointing": ckpt, "overrides": overrides, "config": row_config(cfg)})
        del loaded
        free(device)
    shutil.rmtree(folder, ignore_errors=True)
