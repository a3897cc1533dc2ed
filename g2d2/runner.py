"""One experiment: build prior, solver and data from the config, then solve and score every image.

Nothing here is model-specific: components come from `hydra.utils.instantiate`, and the loop only
uses the interfaces of g2d2.operators.base, g2d2.priors.base and g2d2.solvers.base.
Outputs in `output_dir`: metrics.jsonl (one line per finished image, flushed), images/*.png,
operators/<index>.safetensors (the mask / kernel / permutation each image was measured with),
summary.json (means, std, counts, config, versions) and run_config.json (for resume checks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from g2d2 import metrics as quality
from g2d2.operators.base import LinearOperator, per_image
from g2d2.priors.base import PRECISIONS, DiscretePrior, PixelPrior
from g2d2.provenance import environment_info
from g2d2.results import RESUME_FREE_KEYS, MetricsFile, config_diff, summarize, write_json_atomic
from g2d2.solvers.base import NonFiniteError, check_finite
from g2d2.tracking import measure_cost

logger = logging.getLogger(__name__)

GROUPS = (
    "method", "prior", "task", "noise_schedule", "solver", "setting", "prior_setting", "data", "logger", "experiment",
)


class ConfigError(ValueError):
    """An inconsistent configuration; the message says which keys to change."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise torch.device(name), checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return device


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of image `index`: every random draw of that image comes from it."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def check_config(cfg: DictConfig) -> None:
    if cfg.task.sigma < 0:
        raise ConfigError(f"task.sigma must be >= 0 (noise std on the [-1, 1] scale), got {cfg.task.sigma}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {tuple(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")


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


def check_resume(output_dir: Path, cfg_dict: dict[str, Any], resume: bool, done: list[dict[str, Any]]) -> None:
    """Refuse to mix results of different configs in one folder."""
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
    write_json_atomic(saved, comparable)


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

    handle = open(output_dir / ".lock", "w")  # noqa: SIM115 - held for the whole run
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

    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)


def run(
    cfg: DictConfig,
    output_dir: Path,
    choices: dict[str, str] | None = None,
    tracker: Any | None = None,
) -> dict[str, Any]:
    """Solve every image of cfg.data with cfg.solver on cfg.task; returns the summary dict.

    Args:
        cfg: the composed config (conf/config.yaml).
        output_dir: where results go (Hydra's output folder).
        choices: the config group choices (hydra.runtime.choices), recorded and used as W&B tags.
        tracker: a logger object (default: instantiate(cfg.logger)).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_folder(output_dir):
        return _run(cfg, output_dir, choices, tracker)


def _run(cfg: DictConfig, output_dir: Path, choices: dict[str, str] | None, tracker: Any | None) -> dict[str, Any]:
    check_config(cfg)
    device = resolve_device(cfg.device)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)

    metrics_file = MetricsFile(output_dir / "metrics.jsonl")
    records = metrics_file.read()
    check_resume(output_dir, cfg_dict, cfg.resume, records)
    done = {r["index"] for r in records}

    data = instantiate(cfg.data)
    check_resumed_names(output_dir, records, list(data.names))
    schedule = instantiate(cfg.noise_schedule) if cfg.get("noise_schedule") else None
    solver = instantiate(cfg.solver, noise_schedule=schedule)
    prior = None
    if solver.prior_kind is not None:
        prior = instantiate(
            cfg.prior, device=device, precision=cfg.precision, gradient_checkpointing=cfg.gradient_checkpointing
        )
    check_prior(solver, prior, data.image_size)
    prompts = data_prompts(prior, data)
    lpips = quality.LPIPS(net=cfg.lpips_net).to(device)
    check_lpips_size(lpips, cfg.lpips_net, data.image_size, device)

    tracker = tracker if tracker is not None else instantiate(cfg.logger)
    choices = {k: v for k, v in (choices or {}).items() if k in GROUPS}
    tracker.start(cfg_dict, output_dir, name=output_dir.name, tags=[f"{k}:{v}" for k, v in choices.items()])
    try:
        (output_dir / "images").mkdir(exist_ok=True)
        (output_dir / "operators").mkdir(exist_ok=True)

        if done:
            logger.info("resuming: %d of %d images already finished in %s", len(done), len(data), output_dir)
        # batches are fixed by (dataset, batch_size), not by what is left: a resumed run solves a partly
        # finished batch again with its own generator and writes only its missing images, so its numbers
        # equal those of an uninterrupted run
        indices = list(range(len(data)))
        batches = [indices[k : k + cfg.batch_size] for k in range(0, len(indices), cfg.batch_size)]
        batches = [batch for batch in batches if not done.issuperset(batch)]
        for batch in tqdm(batches, desc="images", unit="batch", disable=not cfg.progress):
            names, images = zip(*(data[i] for i in batch), strict=True)
            x = torch.stack(images).to(device)
            # each image's operator draw (mask, kernel, CS signs) and measurement noise come from its own
            # generator seeded by (seed, index): the problem posed for image i does not depend on batch_size.
            # The solver's draws continue the first image's generator (with batch_size=1, per image).
            generators = [image_generator(cfg.seed, i) for i in batch]
            generator = generators[0]
            if prompts is not None:
                prior.set_prompts([prompts[i] for i in batch])
            operators = [instantiate(cfg.task.operator, generator=g).to(device) for g in generators]
            pairs = enumerate(zip(operators, generators, strict=True))
            y = torch.cat([op.measure(x[j : j + 1], cfg.task.sigma, g) for j, (op, g) in pairs])
            operator = per_image(operators)
            error = None
            with measure_cost(device) as cost:
                try:
                    x_hat = solver.solve(prior, operator, y, generator=generator, progress=cfg.progress)
                    check_finite(x_hat, "the reconstruction")
                except NonFiniteError as err:
                    error = str(err)
            if error is None:
                x_hat = x_hat.detach().float().clamp(-1, 1)
                with torch.no_grad():
                    scores = {
                        "psnr": quality.psnr(x_hat, x).tolist(),
                        "ssim": quality.ssim(x_hat, x).tolist(),
                        "lpips": lpips(x_hat, x).tolist(),
                    }
                view = operator.pinv(y).clamp(-1, 1)
            for index, op in zip(batch, operators, strict=True):
                save_operator_state(op, output_dir / "operators" / f"{index:05d}.safetensors")
            for j, (index, name) in enumerate(zip(batch, names, strict=True)):
                if index in done:
                    continue  # finished before an interruption inside this batch
                record = {
                    "index": index,
                    "name": name,
                    "seconds": cost.seconds / len(batch),
                    "peak_gpu_mem_mb": cost.peak_gpu_mem_mb,
                    "peak_rss_mb": cost.peak_rss_mb,
                    "batch_size": len(batch),
                }
                if prompts is not None:
                    record["prompt"] = prompts[index]
                if error is not None:
                    logger.error("image %d (%s) failed: %s", index, name, error)
                    record.update(status="nonfinite", error=error)
                    metrics_file.append(record)
                    tracker.log_image(index, name, {"failed": 1}, None)
                    continue
                record.update(status="ok", **{k: v[j] for k, v in scores.items()})
                stem = f"{index:05d}_{Path(name).stem}"
                grid = torch.cat([x[j], view[j], x_hat[j]], dim=2)
                if cfg.save_images:
                    for suffix, image in (("gt", x[j]), ("measurement", view[j]), ("recon", x_hat[j])):
                        save_png(image, output_dir / "images" / f"{stem}_{suffix}.png")
                metrics_file.append(record)
                tracker.log_image(index, name, record, grid)
                logger.info(
                    "image %d (%s): PSNR %.2f dB, SSIM %.3f, LPIPS %.3f, %.1f s",
                    index, name, record["psnr"], record["ssim"], record["lpips"], record["seconds"],
                )

        summary = summarize(metrics_file.read())
        summary.update(
            num_expected=len(data),  # images this run was asked for: num_images + num_failed < it = unfinished
            config=cfg_dict,
            choices=choices,
            output_dir=str(output_dir),
            environment=environment_info(device),
        )
        write_json_atomic(output_dir / "summary.json", summary)
        tracker.log_summary(summary)
        logger.info("results: %s (metrics.jsonl, summary.json, images/)", output_dir)
        if tracker.url_or_dir:
            logger.info("W&B run: %s", tracker.url_or_dir)
    finally:
        tracker.finish()  # also on an exception or SIGTERM (scripts/run.py): the W&B run keeps what was logged
    return summary
