"""Peak GPU memory and seconds per image of each solver at paper scale, with random-weight priors.

    python scripts/benchmark.py --scale full --device cuda --measure-steps 3 --measure-steps-pixel 20 \
        --out benchmark.json --markdown benchmark.md
    python scripts/benchmark.py --scale tiny --device cpu --measure-steps 1 --measure-steps-pixel 2 \
        --out /tmp/benchmark.json --markdown /tmp/benchmark.md   # CI smoke test
    python scripts/benchmark.py --solvers g2d2 noise_schedule=star solver.kl_form=exact   # run.py overrides
    python scripts/benchmark.py --solvers dps,red_diff --batch-sizes 1,4,16   # per-image throughput by batch size
    python scripts/benchmark.py --scale cpu --device cpu --solvers g2d2 --discrete-priors vq_diffusion_ithq \
        --precisions fp32 --measure-steps 2 --bare-reps 2   # G2D2 on one CPU thread at ITHQ's shapes

What is measured (images of the prior's size: 256 px at full scale; `--batch-sizes`, default 1, of them per solve):
- Priors are the real architectures with random weights (g2d2.bench.models), saved in our checkpoint
  layouts; time and memory do not depend on the weights.
- Every row is a run.py configuration: conf/config.yaml composed by Hydra with `[+]method=<solver's method
  on that prior shape> task=<task> prior.path=<random checkpoint> precision=... gradient_checkpointing=...
  device=... data.image_size=<prior's size> batch_size=<B>` and the trailing overrides of this command; solver, noise
  schedule and prior are built by the runner's builders from that config (g2d2.bench.rows.METHODS: G2D2
  runs g2d2_imagenet on VQ-Diffusion ITHQ and g2d2_amused_imagenet on aMUSEd 256 / 512 (`--discrete-priors`)
  with one prompt, `--prompt` at guidance `--guidance`: two transformer passes per step; DPS and RED-Diff
  the *_ffhq / *_imagenet methods of each ADM shape). The JSON records each row's
  overrides and resolved configs. Paper step counts: G2D2 100 steps x 30 inner iterations, DPS and
  RED-Diff 1000 steps.
- A solve is not run to the end: a hook on the prior network marks the start of every outer step,
  `--warmup-steps` steps are discarded, the next `--measure-steps` (G2D2) or `--measure-steps-pixel`
  (DPS, RED-Diff: short steps, so more of them against timer noise) are timed, then the solve is
  stopped. The device is synchronised only at the two edges of that window (g2d2.bench.timing).
  s/image = s/step x the solver's num_steps / B (extrapolated; one-off costs such as loading, prompt
  encoding and the final decode are not included); images/h = 3600 / s/image. The B images of a row are posed
  as the runner poses one batch: images 0 .. B-1, each with its own seeded operator draw and noise, and solved
  with the runner's per-image generators.
- Batch sizes: every row is timed at each `--batch-sizes` value (run.py's `batch_size`), ascending; a row that
  runs out of memory is recorded with status "oom", and that solver's larger sizes (same precision) are skipped.
- Peak GPU memory = torch.cuda.max_memory_allocated over the solve (weights included), after
  reset_peak_memory_stats; on CPU the process peak RSS is recorded instead.
- Bare prior cost per step: G2D2 = one guided transformer pass + inner_iters x relaxed-decode
  forward+backward; DPS = UNet forward + backward w.r.t. its input; RED-Diff = UNet forward; each on the
  row's batch of B, the mean of `--bare-reps` back-to-back calls (pixel priors: at least `--measure-steps-pixel`).
  overhead = s/step / bare s/step - 1 (the solver's own work per step; target <= 10 %).
- Host syncs/step (CUDA only, a diagnostic): the synchronising CUDA calls the solver makes per timed
  step, counted with torch.cuda.set_sync_debug_mode("warn") inside the timed window. None on CPU, with
  `--no-count-syncs`, or if the sync debug mode is unavailable. Emitting the warnings costs some host
  time per sync; compare with `--no-count-syncs` if the count is large.
- `--checkpointing on|both` adds rows with the priors' gradient checkpointing (precision column
  "<dtype>+ckpt"): the memory it saves and the time it costs for DPS and G2D2.
- `--profile DIR` writes, per row, a torch.profiler table of one solver step (after one warm-up step)
  to DIR/<solver>_<prior>_<precision>[_b<B> for B > 1].txt. Profiled steps are not part of the timings.
Each row records the counts it used (warmup_steps, measure_steps, steps_timed, bare_reps).
Each configuration catches its own out-of-memory / errors, and the JSON and Markdown files are
rewritten after every configuration, so an interrupted run still leaves its data.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from g2d2.bench import models
from g2d2.bench.report import write_outputs
from g2d2.bench.rows import DISCRETE_PRIORS, SOLVERS, pinv_row, run_group
from g2d2.experiment.cli import CONF_DIR
from g2d2.priors.base import PRECISIONS

logger = logging.getLogger("benchmark")


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


def _batch_sizes(text: str, parser: argparse.ArgumentParser) -> list[int]:
    """`--batch-sizes 1,4,16` -> [1, 4, 16]: distinct, ascending (a size after an out-of-memory one is skipped)."""
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--batch-sizes takes a comma list of integers, e.g. 1,4,16; got {text!r}")
    if not sizes or sizes[0] < 1:
        parser.error(f"--batch-sizes must be integers >= 1, e.g. 1,4,16; got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=("full", "tiny", "cpu"), default="full",
                   help="full: real shapes, 256 px; tiny: smoke; cpu: VQ-Diffusion ITHQ's 256 px images, tokens and "
                   "codes with narrow networks (G2D2 and pinv only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--solvers", default="g2d2,red_diff,dps,pinv", help=f"comma list of {list(SOLVERS)}")
    p.add_argument("--precisions", default="fp32,fp16",
                   help=f"comma list of {tuple(PRECISIONS)}: weight dtype; amp_* = fp32 weights under autocast")
    p.add_argument("--discrete-priors", default=",".join(DISCRETE_PRIORS),
                   help=f"comma list of {', '.join(DISCRETE_PRIORS)}: the token priors G2D2 rows run on")
    p.add_argument("--pixel-priors", default="adm_ffhq,adm_imagenet", help="comma list of adm_ffhq, adm_imagenet")
    p.add_argument("--task", default="sr4", help="conf/task/<task>.yaml")
    p.add_argument("--batch-sizes", default="1", help="comma list of run.py's batch_size: every row is timed at each "
                   "(images solved together; s/image and images/h are per image)")
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
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides of run.py applied to every row after the benchmark's own, e.g. "
                        "noise_schedule=star or task.sigma=0.1")
    args = p.parse_args(argv)
    if not (CONF_DIR / "task" / f"{args.task}.yaml").is_file():
        p.error(f"no task config conf/task/{args.task}.yaml; choose from "
                f"{sorted(f.stem for f in (CONF_DIR / 'task').glob('*.yaml'))}")
    args.solvers = _split(args.solvers, SOLVERS, "solver(s)", p)
    args.precisions = _split(args.precisions, PRECISIONS, "precision(s)", p)
    args.pixel_priors = _split(args.pixel_priors, models.ADM_SHAPES, "pixel prior(s)", p)
    args.discrete_priors = _split(args.discrete_priors, DISCRETE_PRIORS, "discrete prior(s)", p)
    if args.scale == "cpu" and (set(args.solvers) - {"g2d2", "pinv"} or args.discrete_priors != ["vq_diffusion_ithq"]):
        p.error("--scale cpu has VQ-Diffusion ITHQ shapes only: pass --solvers g2d2 (or g2d2,pinv) and "
                "--discrete-priors vq_diffusion_ithq")
    args.checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    args.batch_sizes = _batch_sizes(args.batch_sizes, p)
    if args.bare_reps is None:
        args.bare_reps = 5 if args.scale == "full" else 2
    if args.threads is None and args.scale in ("tiny", "cpu"):
        args.threads = 1
    if min(args.measure_steps, args.measure_steps_pixel, args.bare_reps) < 1 or args.warmup_steps < 0:
        p.error("--measure-steps, --measure-steps-pixel and --bare-reps must be >= 1, --warmup-steps >= 0")
    args.pinv_size = models.TINY_IMAGE_SIZE if args.scale == "tiny" else 256
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
        "scale": args.scale, "task": args.task, "batch_sizes": args.batch_sizes, "precisions": args.precisions,
        "measure_steps": args.measure_steps, "measure_steps_pixel": args.measure_steps_pixel,
        "warmup_steps": args.warmup_steps, "bare_reps": args.bare_reps, "count_syncs": args.count_syncs,
        "sync_rule": "device synchronised only at the timed window's edges",
        "checkpointing": args.checkpointing, "profile": args.profile,
        "prompt": args.prompt, "guidance": args.guidance, "overrides": args.overrides,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every configuration the arguments select; returns (and writes) {"meta": ..., "rows": [...]}."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = str(device)  # the rows' `device=` override
    result = {"meta": _meta(args, device), "rows": []}

    def add(row: dict) -> None:
        row["elapsed_s"] = time.perf_counter() - start
        result["rows"].append(row)
        write_outputs(result, args.out, args.markdown)  # after every configuration: a killed run keeps its data
        logger.info("%s", {k: v for k, v in row.items() if k not in ("prior", "overrides", "config")})

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    if "pinv" in args.solvers:
        for batch_size in args.batch_sizes:
            add(pinv_row(args, device, batch_size))
    # G2D2 first (the number the comparison is about) on each discrete prior, then the pixel solvers per ADM shape
    groups = [(name, ["g2d2"]) for name in args.discrete_priors] if "g2d2" in args.solvers else []
    pixel = [s for s in args.solvers if SOLVERS[s] == "pixel"]
    groups += [(name, pixel) for name in args.pixel_priors] if pixel else []
    workdir = _workdir(args, needed_gib=4.0 if args.scale == "full" else 0.1)
    try:
        for prior, solvers in groups:
            if over_budget():
                for s in solvers:
                    for prec in args.precisions:
                        for b in args.batch_sizes:
                            add({"solver": s, "prior": prior, "precision": prec, "batch_size": b, "status": "skipped",
                                 "error": "budget"})
                continue
            run_group(prior, solvers, workdir, args, device, add, over_budget)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["meta"]["total_s"] = time.perf_counter() - start
    write_outputs(result, args.out, args.markdown)
    return result
