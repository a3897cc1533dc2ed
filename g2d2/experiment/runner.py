"""One experiment: build prior, solver and data from the config, then solve and score every image.

Nothing here is model-specific: components come from `hydra.utils.instantiate`, and the loop only
uses the interfaces of g2d2.operators.base, g2d2.priors.base and g2d2.solvers.base.
Outputs in `output_dir`: metrics.jsonl (one line per finished image, flushed), images/*.png,
operators/<index>.safetensors (the mask / kernel / permutation each image was measured with),
summary.json (means, std, counts, config, versions) and run_config.json (for resume checks).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from g2d2.data import to_uint8
from g2d2.errors import UserError
from g2d2.experiment import metrics as quality
from g2d2.experiment.devices import claim_device
from g2d2.experiment.provenance import environment_info
from g2d2.experiment.results import RESUME_FREE_KEYS, MetricsFile, config_diff, summarize, write_json_atomic
from g2d2.experiment.tracking import measure_cost
from g2d2.operators.base import LinearOperator, per_image
from g2d2.priors.base import PRECISIONS, DiscretePrior, PixelPrior
from g2d2.solvers.base import NonFiniteError, check_finite

logger = logging.getLogger(__name__)

GROUPS = (
    "method", "prior", "task", "noise_schedule", "solver", "setting", "setting@_global_", "data", "logger",
    "experiment",
)


class ConfigError(UserError, ValueError):
    """An inconsistent configuration; the message says which keys to change."""


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of image `index`: every random draw of that image comes from it."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def build_solver(cfg: DictConfig) -> Any:
    """The solver of cfg.solver, given the noise process of cfg.noise_schedule (None when that group is null)."""
    schedule = instantiate(cfg.noise_schedule) if cfg.get("noise_schedule") else None
    return instantiate(cfg.solver, noise_schedule=schedule)


def build_prior(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """The prior of cfg.prior on `device` at cfg.precision, with cfg.gradient_checkpointing (loads its weights)."""
    return instantiate(
        cfg.prior, device=device, precision=cfg.precision, gradient_checkpointing=cfg.gradient_checkpointing
    )


#: integer keys (dotted, checked where the config has them) and their smallest allowed value
INTEGER_KEYS = {"batch_size": 1, "solver.num_steps": 1, "solver.inner_iters": 1, "seed": 0, "data.offset": 0}


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """The config's values have the types and ranges the run needs; called before anything is built or written."""
    sigma = cfg.task.sigma
    if not (isinstance(sigma, int | float) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(
            f"task.sigma must be a finite number >= 0 (noise std on the [-1, 1] scale), got {sigma!r}; "
            "set e.g. task.sigma=0.05, or task.sigma=0 for noiseless measurements"
        )
    for key, low in INTEGER_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not (_is_integer(value) and value >= low):
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}; set e.g. {key}={max(low, 1)}")
    limit = OmegaConf.select(cfg, "data.limit", default=None)
    if limit is not None and not (_is_integer(limit) and limit >= 1):
        raise ConfigError(f"data.limit must be an integer >= 1 or null (all images), got {limit!r}")
    shard = OmegaConf.select(cfg, "data.shard", default=0)
    num_shards = OmegaConf.select(cfg, "data.num_shards", default=1)
    if not (_is_integer(shard) and _is_integer(num_shards) and num_shards >= 1 and 0 <= shard < num_shards):
        raise ConfigError(f"data.shard must be an integer in 0 .. data.num_shards-1 and data.num_shards an integer "
                          f">= 1, got data.shard={shard!r}, data.num_shards={num_shards!r}; e.g. data.shard=0 "
                          "data.num_shards=4")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {tuple(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.lpips_net not in quality.LPIPS_NETS:
        raise ConfigError(f"lpips_net must be one of {quality.LPIPS_NETS}, got {cfg.lpips_net!r}")


def check_prior(solver: Any, prior: torch.nn.Module | None, image_size: int) -> None:
    """The solver's prior kind and the prior's image size must match the run."""
    kinds = {"discrete": DiscretePrior, "pixel": PixelPrior}
    if solver.prior_kind is None:
        return
    if not isinstance(prior, kinds[solver.prior_kind]):
        raise ConfigError(
            f"solver {type(solver).__name__} needs a {solver.prior_kind} prior, got {type(prior).__name__}; "
            f"choose e.g. prior={'tiny_vq' if solver.prior_kind == 'discrete' else 'tiny_ddpm'}"
        )
    if prior.image_size != image_size:
        raise ConfigError(
            f"prior {type(prior).__name__} makes {prior.image_size} px images but data.image_size={image_size}; "
            f"set data.image_size={prior.image_size} or pick a prior trained at {image_size} px"
        )


def data_image_size(cfg: DictConfig, prior: torch.nn.Module | None) -> int:
    """data.image_size, or the prior's image size when it is null (data=folder: follow the prior)."""
    size = cfg.data.get("image_size")
    if size is not None:
        if not (_is_integer(size) and size > 0):
            raise ConfigError(f"data.image_size must be a positive integer or null (the prior's size), got {size!r}")
        return size
    if prior is None:
        raise ConfigError("data.image_size=null follows the prior's image size, but this solver uses no prior; "
                          "set data.image_size, e.g. data.image_size=256")
    logger.info("data.image_size follows the prior: %d px", prior.image_size)
    return int(prior.image_size)


def check_lpips_size(lpips: torch.nn.Module, net: str, image_size: int, device: torch.device) -> None:
    """LPIPS on one blank image of the run's size, so a size its backbone cannot take fails before solving."""
    blank = torch.zeros(1, 3, image_size, image_size, device=device)
    try:
        with torch.no_grad():
            lpips(blank, blank)
    except RuntimeError as err:
        raise ConfigError(
            f"LPIPS with lpips_net={net} cannot score {image_size} px images ({str(err)[:80]}); use "
            "lpips_net=vgg or data.image_size >= 32"
        ) from err


def data_prompts(prior: torch.nn.Module | None, data: Any) -> list[str] | None:
    """The per-image prompts of a `prompt_from_data` prior (one per image of `data`), else None."""
    if not getattr(prior, "prompt_from_data", False):
        return None
    if not callable(getattr(data, "prompt", None)):
        raise ConfigError(
            f"prior.prompt_from_data=true needs per-image prompts from the data, but {type(data).__name__} has "
            "none; use data=imagenet with a file list of '<name> <class index>' lines, or set prior.prompt"
        )
    prompts = [data.prompt(i) for i in range(len(data))]
    names = getattr(data, "names", None)
    missing = [names[i] if names else str(i) for i, p in enumerate(prompts) if not p]
    if missing:
        raise ConfigError(
            f"prior.prompt_from_data=true but {len(missing)} images have no prompt (no class label), e.g. "
            f"{missing[:3]}; give data.file_list with '<name> <class index>' lines, or set prior.prompt"
        )
    return prompts


def save_operator_state(operator: LinearOperator, path: Path) -> None:
    """The operator's random draws (mask, kernel, CS signs / indices) as safetensors; nothing when it has none."""
    state = {k: v.detach().cpu().contiguous() for k, v in operator.state().items()}
    if state:
        from safetensors.torch import save_file

        save_file(state, str(path))


def check_resume(
    output_dir: Path, cfg_dict: dict[str, Any], resume: bool, done: list[dict[str, Any]]
) -> dict[str, Any]:
    """Refuse to mix results of different configs in one folder; returns the config to store in
    run_config.json (the keys a resume must not change)."""
    import json

    saved = output_dir / "run_config.json"
    if done and not resume:
        raise ConfigError(
            f"{output_dir} already holds {len(done)} finished images; pass resume=true to continue that run "
            "or choose another hydra.run.dir"
        )
    comparable = {k: v for k, v in cfg_dict.items() if k not in RESUME_FREE_KEYS}
    if saved.exists() and done:
        previous = json.loads(saved.read_text())
        if previous != comparable:
            changed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in config_diff(previous, comparable))
            raise ConfigError(f"cannot resume {output_dir}: the config changed ({changed}); use a new folder")
    return comparable


def check_resumed_names(output_dir: Path, records: list[dict[str, Any]], names: list[str]) -> None:
    """Finished records must be the same images as the data set now lists at their index (a folder that
    gained or lost images would otherwise skip the wrong ones)."""
    moved = [(r["index"], r.get("name")) for r in records
             if r["index"] >= len(names) or r.get("name") != names[r["index"]]]
    if moved:
        index, name = moved[0]
        now = names[index] if index < len(names) else "no image"
        raise ConfigError(
            f"cannot resume {output_dir}: {len(moved)} finished images are no longer at their index in the data "
            f"(e.g. index {index} was {name!r}, now {now!r}); the image folder or list changed: use a new folder"
        )


@contextmanager
def exclusive_folder(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` for the run: a second run into the same folder fails at once
    instead of interleaving its records with this one's."""
    import fcntl

    try:
        handle = open(output_dir / ".lock", "a")  # noqa: SIM115 - held for the whole run
    except OSError as err:
        raise ConfigError(
            f"cannot write into the output folder {output_dir} ({err.strerror}); choose a writable hydra.run.dir"
        ) from err
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ConfigError(
                f"another run is writing into {output_dir}; wait for it, or choose another hydra.run.dir"
            ) from err
        yield
    finally:
        handle.close()


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [-1, 1] -> 8-bit PNG."""
    from PIL import Image

    Image.fromarray(to_uint8(image)).save(path)


def run(
    cfg: DictConfig,
    output_dir: Path,
    choices: dict[str, str] | None = None,
    tracker: Any | None = None,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Solve every image of cfg.data with cfg.solver on cfg.task; returns the summary dict.

    Every check (config values, resume, data, checkpoints, image files) runs before anything is written
    into `output_dir`; a run that fails them leaves the folder as it found it (and no `.lock` behind).

    Args:
        cfg: the composed config (conf/config.yaml).
        output_dir: where results go (Hydra's output folder).
        choices: the config group choices (hydra.runtime.choices), recorded and used as W&B tags.
        tracker: a logger object (default: instantiate(cfg.logger)).
        on_start: called once every check has passed, under the folder lock, before the first write
            (scripts/run.py saves the Hydra config there, so a refused run does not overwrite it).
    """
    check_config(cfg)
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output folder {output_dir} ({err.strerror}); choose another "
                          "hydra.run.dir") from err
    with exclusive_folder(output_dir), ExitStack() as held:
        try:
            device = held.enter_context(claim_device(cfg.device))  # device=auto: a GPU no other run holds
            job = _prepare(cfg, output_dir, device)
            tracker = tracker if tracker is not None else instantiate(cfg.logger)  # checks its values, starts nothing
        except BaseException:
            if not (output_dir / "metrics.jsonl").exists():
                (output_dir / ".lock").unlink(missing_ok=True)  # a failed start leaves no trace
            raise
        if on_start is not None:
            on_start()
        return _solve(job, output_dir, choices, tracker)


@dataclass
class _Job:
    """What a checked run solves with (built by _prepare, nothing written yet)."""

    cfg: DictConfig  # data.image_size resolved
    device: torch.device
    cfg_dict: dict[str, Any]
    comparable: dict[str, Any]  # the config stored in run_config.json
    metrics_file: MetricsFile
    done: set[int]  # image indices already in metrics.jsonl
    data: Any  # every image of the cell (all shards): indices are positions in it
    shard: dict[str, int]  # this run's shard: shard, num_shards, and its images data[start:stop] of cell_images
    solver: Any
    prior: torch.nn.Module | None
    prompts: list[str] | None
    lpips: torch.nn.Module


def _prepare(cfg: DictConfig, output_dir: Path, device: torch.device) -> _Job:
    """Build solver, prior, data and one operator and run every check, writing nothing (but the repair of an
    interrupted metrics.jsonl line); returns what _solve needs."""
    solver = build_solver(cfg)
    prior = build_prior(cfg, device) if solver.prior_kind is not None else None
    if cfg.data.get("image_size") is None:  # follow the prior: record the size it resolved to
        size = data_image_size(cfg, prior)
        cfg = copy.deepcopy(cfg)
        cfg.data.image_size = size
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)

    metrics_file = MetricsFile(output_dir / "metrics.jsonl")
    records = metrics_file.read()
    comparable = check_resume(output_dir, cfg_dict, cfg.resume, records)

    data = instantiate(cfg.data, image_size=data_image_size(cfg, prior))
    shard = shard_of(data)
    check_resumed_names(output_dir, records, list(data.names))
    check_prior(solver, prior, data.image_size)
    prompts = data_prompts(prior, data)
    lpips = quality.LPIPS(net=cfg.lpips_net).to(device)
    check_lpips_size(lpips, cfg.lpips_net, data.image_size, device)
    instantiate(cfg.task.operator, generator=image_generator(cfg.seed, 0))  # the task's values fit the images
    data.check()  # every image of the shard opens (and its size is known) before the first solve
    return _Job(cfg, device, cfg_dict, comparable, metrics_file, {r["index"] for r in records}, data, shard, solver,
                prior, prompts, lpips)


def shard_of(data: Any) -> dict[str, int]:
    """The run's shard of the cell's images (all of `data`): {shard, num_shards, start, stop, cell_images}."""
    if data.num_shards > len(data):
        raise ConfigError(f"data.num_shards={data.num_shards} but the data selects {len(data)} images, so some "
                          f"shards would be empty; use data.num_shards <= {len(data)}")
    return {"shard": data.shard, "num_shards": data.num_shards, "start": data.indices.start,
            "stop": data.indices.stop, "cell_images": len(data)}


def _solve(job: _Job, output_dir: Path, choices: dict[str, str] | None, tracker: Any) -> dict[str, Any]:
    """Solve the batches not finished yet, record each image as its batch ends, then summarise."""
    cfg, cfg_dict, metrics_file, done, data = job.cfg, job.cfg_dict, job.metrics_file, job.done, job.data
    write_json_atomic(output_dir / "run_config.json", job.comparable)
    write_json_atomic(output_dir / "shard.json", job.shard)  # what this run solves, for `make_table --status`
    logger.info("output folder: %s", output_dir)

    choices = {k: v for k, v in (choices or {}).items() if k in GROUPS}
    tracker.start(cfg_dict, output_dir, name=output_dir.name, tags=[f"{k}:{v}" for k, v in choices.items()])
    try:
        (output_dir / "images").mkdir(exist_ok=True)
        (output_dir / "operators").mkdir(exist_ok=True)

        indices = list(range(job.shard["start"], job.shard["stop"]))  # global indices: image i is i in any shard
        if job.shard["num_shards"] > 1:
            logger.info("shard %d of %d: images %d .. %d of %d", job.shard["shard"], job.shard["num_shards"],
                        indices[0], indices[-1], len(data))
        if done:
            logger.info("resuming: %d of %d images already finished in %s", len(done), len(indices), output_dir)
        # batches are fixed by (shard, batch_size), not by what is left: a resumed run solves a partly
        # finished batch again with its own generator and writes only its missing images, so its numbers
        # equal those of an uninterrupted run
        batches = [indices[k : k + cfg.batch_size] for k in range(0, len(indices), cfg.batch_size)]
        batches = [batch for batch in batches if not done.issuperset(batch)]
        for batch in tqdm(batches, desc="images", unit="batch", disable=not cfg.progress):
            _record(job, output_dir, tracker, batch, _solve_batch(job, batch, tracker))

        summary = summarize(metrics_file.read())
        summary.update(
            num_expected=len(indices),  # images this run was asked for: num_images + num_failed < it = unfinished
            shard=job.shard,
            config=cfg_dict,
            choices=choices,
            output_dir=str(output_dir),
            environment=environment_info(job.device),
        )
        write_json_atomic(output_dir / "summary.json", summary)
        tracker.log_summary(summary)
        logger.info("results: %s (metrics.jsonl, summary.json, images/)", output_dir)
        if tracker.url_or_dir:
            logger.info("W&B run: %s", tracker.url_or_dir)
    finally:
        tracker.finish()  # also on an exception or SIGTERM (scripts/run.py): the W&B run keeps what was logged
    return summary


@dataclass
class _Solved:
    """One solved batch: images (B, 3, H, W), the measurement's pseudo-inverse view, the reconstruction and
    its scores (None and an error message when the solve was not finite), its cost and operators."""

    names: tuple[str, ...]
    x: torch.Tensor
    view: torch.Tensor | None
    x_hat: torch.Tensor | None
    scores: dict[str, list[float]] | None
    error: str | None
    cost: Any
    operators: list[LinearOperator]


def pose_batch(
    cfg: DictConfig, x: torch.Tensor, indices: list[int], device: torch.device
) -> tuple[list[LinearOperator], list[torch.Generator], torch.Tensor]:
    """The problems of the images `indices` (ground truths x, (B, 3, H, W) on `device`): their operators, their
    generators and the measurements y (B, ...).

    Each image's operator draw (mask, kernel, CS signs) and measurement noise come from its own generator seeded
    by (seed, index): the problem posed for image i does not depend on batch_size. The solver's draws continue
    each image's generator (one stream per image, see g2d2.rng), so they do not depend on batch_size either.
    """
    generators = [image_generator(cfg.seed, i) for i in indices]
    operators = [instantiate(cfg.task.operator, generator=g).to(device) for g in generators]
    pairs = enumerate(zip(operators, generators, strict=True))
    y = torch.cat([op.measure(x[j : j + 1], cfg.task.sigma, g) for j, (op, g) in pairs])
    return operators, generators, y


def _solve_batch(job: _Job, batch: list[int], tracker: Any) -> _Solved:
    """Pose and solve the problems of one batch of image indices, and score the reconstructions."""
    cfg, device = job.cfg, job.device
    names, images = zip(*(job.data[i] for i in batch), strict=True)
    x = torch.stack(images).to(device)
    if job.prompts is not None:
        job.prior.set_prompts([job.prompts[i] for i in batch])
    operators, generators, y = pose_batch(cfg, x, batch, device)
    operator = per_image(operators)
    x_hat = view = scores = error = None
    with measure_cost(device) as cost:
        try:
            callback = tracker.step_callback(batch[0], job.prior)
            x_hat = job.solver.solve(job.prior, operator, y, generator=generators, progress=cfg.progress,
                                     callback=callback)
            check_finite(x_hat, "the reconstruction")
        except NonFiniteError as err:
            x_hat, error = None, str(err)
    if error is None:
        x_hat = x_hat.detach().float().clamp(-1, 1)
        with torch.no_grad():
            scores = {
                "psnr": quality.psnr(x_hat, x).tolist(),
                "ssim": quality.ssim(x_hat, x).tolist(),
                "lpips": job.lpips(x_hat, x).tolist(),
            }
        view = operator.pinv(y).clamp(-1, 1)
    return _Solved(names, x, view, x_hat, scores, error, cost, operators)


def _record(job: _Job, output_dir: Path, tracker: Any, batch: list[int], solved: _Solved) -> None:
    """Write a solved batch: operator states, then per image its metrics line, PNGs and tracker entry
    (images finished before an interruption inside this batch are not written again)."""
    for index, op in zip(batch, solved.operators, strict=True):
        save_operator_state(op, output_dir / "operators" / f"{index:05d}.safetensors")
    for j, (index, name) in enumerate(zip(batch, solved.names, strict=True)):
        if index in job.done:
            continue
        record = {
            "index": index,
            "name": name,
            "seconds": solved.cost.seconds / len(batch),
            "peak_gpu_mem_mb": solved.cost.peak_gpu_mem_mb,
            "peak_rss_mb": solved.cost.peak_rss_mb,
            "batch_size": len(batch),
        }
        if job.prompts is not None:
            record["prompt"] = job.prompts[index]
        if solved.error is not None:
            logger.error("image %d (%s) failed: %s", index, name, solved.error)
            record.update(status="nonfinite", error=solved.error)
            job.metrics_file.append(record)
            tracker.log_image(index, name, {"failed": 1}, None)
            continue
        record.update(status="ok", **{k: v[j] for k, v in solved.scores.items()})
        x, view, x_hat = solved.x[j], solved.view[j], solved.x_hat[j]
        if job.cfg.save_images:
            stem = f"{index:05d}_{Path(name).stem}"
            for suffix, image in (("gt", x), ("measurement", view), ("recon", x_hat)):
                save_png(image, output_dir / "images" / f"{stem}_{suffix}.png")
        job.metrics_file.append(record)
        tracker.log_image(index, name, record, torch.cat([x, view, x_hat], dim=2))
        logger.info(
            "image %d (%s): PSNR %.2f dB, SSIM %.3f, LPIPS %.3f, %.1f s",
            index, name, record["psnr"], record["ssim"], record["lpips"], record["seconds"],
        )
