"""The one entry point: `python scripts/run.py [group=option ...] [key=value ...]`, `-m` to sweep.

Examples:
    python scripts/run.py                                   # G2D2, tiny VQ prior, SR x4, embedded images
    python scripts/run.py -m task=sr4,gauss_deblur solver=g2d2,pinv
    python scripts/run.py solver=dps prior=tiny_ddpm task=inpaint_box
    python scripts/run.py --resume outputs/runs/<date>/<time>_sr4_g2d2    # continue an interrupted run
See README.md and conf/ for every option.

A bad input (config value, data, checkpoint, output folder, resume mismatch) stops the run before any
image is solved with one line on stderr, `error: <what is wrong and what to do>`, and exit status 2;
the run folder it would have created is removed. HYDRA_FULL_ERROR=1 shows the traceback instead.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

#: the repository's conf/ (the package is installed editable from the repository: `pip install -e .`)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: exit status of a run refused because of its input
EXIT_BAD_INPUT = 2
#: what Hydra writes into a run folder before the job runs (the log file of conf's job_logging)
HYDRA_LOG = "run.log"
#: the user asked for tracebacks (read before cli() sets the variable for Hydra)
SHOW_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a SLURM time limit or preemption, `kill`) unwinds like Ctrl-C: the finished images are
    already on disk, and the W&B run is finished with what it logged instead of being cut off."""
    sys.exit(128 + signum)


def handle_sigterm() -> None:
    """Install exit_on_sigterm unless the process already handles SIGTERM: a job of hydra-submitit-launcher
    does (submitit ignores the SIGTERM that precedes its preemption signal, USR2, whose handler requeues the
    job and then exits: that exit unwinds the run the same way), and replacing it would end the job before
    it can requeue itself."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, exit_on_sigterm)


def save_hydra_config(cfg: DictConfig, output_dir: Path) -> None:
    """`.hydra/{config,hydra,overrides}.yaml` as Hydra writes them, but only once the run passed its checks:
    conf/config.yaml sets `hydra.output_subdir: null`, so a refused run (locked folder, changed config)
    cannot overwrite the record of the run that folder holds."""
    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}
    folder = output_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    (folder / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra_cfg), encoding="utf-8")
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task), encoding="utf-8")


def remove_if_unused(output_dir: Path) -> None:
    """After a failed start: remove the run folder when it holds nothing but Hydra's log file."""
    try:
        if {p.name for p in output_dir.iterdir()} <= {HYDRA_LOG}:
            (output_dir / HYDRA_LOG).unlink(missing_ok=True)
            output_dir.rmdir()
    except OSError:
        pass  # a folder we cannot read or change is left as it is


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from g2d2.experiment.runner import run

    handle_sigterm()

    runtime = HydraConfig.get().runtime
    output_dir = Path(runtime.output_dir)
    started = []

    def on_start() -> None:
        started.append(True)
        save_hydra_config(cfg, output_dir)

    try:
        run(cfg, output_dir, choices=dict(runtime.choices), on_start=on_start)
    except BaseException as err:
        if not started:
            remove_if_unused(output_dir)
        if isinstance(err, Exception) and HydraConfig.get().mode == RunMode.RUN:
            refuse(err)  # here, not in cli(): Hydra would first print "Error executing job with overrides"
        raise  # a bug, or a sweep's job: the sweep goes on and cli() reports the first failure


def one_line(text: str) -> str:
    """A multi-line message as one line: indented items after a 'header:' line become a comma list, and
    Hydra's 'Config search path' listing is dropped."""
    out = ""
    listing = False
    for raw in text.split("Config search path:")[0].splitlines():
        line = raw.strip()
        if not line:
            continue
        listing = raw[:1].isspace() and (listing or out.endswith(":"))
        out += (", " if listing and not out.endswith(":") else " ") + line
    return out.strip()


def user_message(err: BaseException) -> str | None:
    """The one-line message of an error the user fixes by changing an input, or None (a bug)."""
    from hydra.errors import CompactHydraException, InstantiationException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from g2d2.errors import UserError

    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__
    for e in chain:
        if isinstance(e, UserError):
            return one_line(str(e))
    for e, cause in zip(chain, chain[1:], strict=False):
        if isinstance(e, InstantiationException) and isinstance(
            cause, ValueError | TypeError | ImportError | AttributeError
        ):
            # a component's constructor refused a config value or an added key (or _target_ does not exist)
            key = str(e).rpartition("full_key: ")[2].strip() if "full_key: " in str(e) else "config"
            return f"{key}: {one_line(str(cause))}"
    for e in chain:
        if isinstance(e, MissingMandatoryValue):
            key = getattr(e, "full_key", None) or "a config key"
            return (f"{key} has no value (???); add {key}=<value> to the command line (its yaml in conf/ says what it "
                    "is; some read an environment variable)")
    if isinstance(chain[0], CompactHydraException | OmegaConfBaseException):
        return one_line(str(chain[0]))
    for e in chain:
        if isinstance(e, OSError) and e.filename is not None:  # e.g. Hydra creating the folder or its run.log
            return (f"{e.strerror}: {e.filename}; check that path (the output folder is hydra.run.dir, "
                    "hydra.sweep.dir with -m)")
    return None


def refuse(err: Exception) -> None:
    """Exit with one line on stderr and EXIT_BAD_INPUT when `err` is a bad input; return when it is a bug."""
    message = None if SHOW_TRACEBACK else user_message(err)
    if message is not None:
        sys.stderr.write(f"error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def resume_argv(argv: list[str]) -> list[str]:
    """`run.py --resume FOLDER [override ...]` -> `run.py <FOLDER's overrides> hydra.run.dir=FOLDER resume=true
    [override ...]`: the run in FOLDER continues from its own record (.hydra/overrides.yaml), nothing retyped.
    A given override replaces the stored one of the same key (e.g. device=cuda)."""
    if "--resume" not in argv:
        return argv
    from g2d2.errors import UserError

    at = argv.index("--resume")
    if at + 1 >= len(argv) or "-m" in argv or "--multirun" in argv:
        raise UserError("usage: run.py --resume <run folder> [override ...] (one run folder, not a sweep)")
    folder = Path(argv[at + 1])
    saved = folder / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise UserError(f"{saved} does not exist: --resume takes the folder of a started run (it holds .hydra/)")
    given = argv[1:at] + argv[at + 2 :]
    key = lambda override: override.split("=", 1)[0].lstrip("+~")  # noqa: E731
    stored = [*map(str, OmegaConf.load(saved)), f"hydra.run.dir={folder}", "resume=true"]
    return [argv[0], *(o for o in stored if key(o) not in {key(g) for g in given}), *given]


def cli() -> None:
    """Run main(); a bad input ends with one line on stderr and EXIT_BAD_INPUT instead of a traceback."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises every error instead of printing it: decided here
    try:
        sys.argv = resume_argv(sys.argv)
        main()
    except Exception as err:
        refuse(err)
        raise
