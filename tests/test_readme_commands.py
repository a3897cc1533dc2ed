"""Every `python scripts/...` command of README.md works as written, so a documented command cannot break
silently:

- every `scripts/run.py` command composes, each job of a sweep on its own (the command line's lists and an
  experiment's `hydra.sweeper.params`, expanded as Hydra's basic sweeper does), with the environment
  variables its code block exports, and its config resolves;
- those that run on the embedded priors and images run, on the smallest budget (one image, two solver
  steps, W&B off, outputs in tmp_path); `--cfg` commands run as written. The others need checkpoints,
  data sets, a GPU or a cluster (or sweep over the no-prior solver, which has no step count to shrink): they
  are composed only;
- the options of every other script's command exist (its `--help` lists them).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

README = ROOT / "README.md"
#: budget overrides appended to a runnable command (a key the command sets is replaced)
BUDGET = {"logger": "none", "progress": "false", "data.limit": "1"}
STEP_KEYS = {"solver.num_steps": "2", "solver.inner_iters": "2"}


@dataclass
class Command:
    text: str  # as README writes it (continuations joined)
    script: str  # e.g. "run.py"
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # the `export`s above it in its code block

    def __str__(self) -> str:
        return self.text


def readme_commands() -> list[Command]:
    """The `python scripts/<x>.py ...` commands of README's fenced code blocks: `\\` continuations joined,
    comments and leading `VAR=value` assignments dropped, `&&` chains split, a trailing `&` removed."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M):
        env: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["export"]:
                env.update(word.split("=", 1) for word in words[1:])
                continue
            parts: list[list[str]] = [[]]
            for word in words:
                if word == "&&":
                    parts.append([])
                elif word != "&":
                    parts[-1].append(word)
            for part in parts:
                while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
                    part = part[1:]
                if len(part) >= 2 and part[0] == "python" and part[1].startswith("scripts/"):
                    text = " ".join(shlex.quote(w) for w in part)
                    commands.append(Command(text, Path(part[1]).name, part[2:], dict(env)))
    return commands


COMMANDS = readme_commands()
RUN_COMMANDS = [c for c in COMMANDS if c.script == "run.py"]
OTHER_COMMANDS = [c for c in COMMANDS if c.script != "run.py"]


def split_run_args(args: list[str]) -> tuple[bool, list[str], list[str]]:
    """(multirun, Hydra flags such as `--cfg job`, overrides)."""
    multirun, flags, overrides = False, [], []
    words = iter(args)
    for word in words:
        if word in ("-m", "--multirun"):
            multirun = True
        elif word in ("--cfg", "-c", "--package", "-p"):
            flags += [word, next(words)]
        elif word.startswith("-"):
            flags.append(word)
        else:
            overrides.append(word)
    return multirun, flags, overrides


def jobs_of(command: Command, monkeypatch) -> list[list[str]]:
    """The override list of each job the command launches (one for a single run)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for key, value in command.env.items():
        monkeypatch.setenv(key, value)
    multirun, _, overrides = split_run_args(command.args)
    overrides = [re.sub(r"<[a-z_]+>", "placeholder", o) for o in overrides]  # what the user fills in, e.g. <date>
    parser = OverridesParser.create()
    if not multirun:
        return [overrides]
    plain = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    params = compose_config(plain, return_hydra_config=True).hydra.sweeper.params or {}
    declared = [f"{k}={v}" for k, v in params.items()]
    (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(declared + overrides), None)
    return batch


def compose_jobs(command: Command, monkeypatch) -> list:
    """Each job's composed config, resolved (every interpolation but Hydra's own must resolve)."""
    configs = []
    for job in jobs_of(command, monkeypatch):
        cfg = compose_config(job, return_hydra_config=True)
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.to_container(task_cfg, resolve=True)
        configs.append(cfg)
    return configs


def runnable(command: Command, configs: list) -> bool:
    """Runs here: embedded priors and images only, the basic launcher, CPU, a step count to shrink."""
    if "<" in command.text:  # a placeholder such as <date>
        return False
    for cfg in configs:
        prior_path = str(OmegaConf.select(cfg, "prior.path", default="") or "")
        if cfg.get("prior") is not None and not prior_path.startswith("embedded:"):
            return False
        if cfg.data._target_ != "g2d2.data.EmbeddedImages" or str(cfg.device).startswith("cuda"):
            return False
        if cfg.hydra.runtime.choices.get("hydra/launcher", "basic") != "basic" or "num_steps" not in cfg.solver:
            return False
    return True


def with_budget(args: list[str], configs: list, tmp_path: Path) -> list[str]:
    budget = dict(BUDGET)
    budget.update({k: v for k, v in STEP_KEYS.items() if all(k.split(".")[1] in cfg.solver for cfg in configs)})
    kept = [a for a in args if a.split("=", 1)[0] not in budget]
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return kept + [f"{k}={v}" for k, v in budget.items()] + dirs


def run_script(script: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_readme_documents_commands():
    assert len(RUN_COMMANDS) >= 10 and OTHER_COMMANDS, [str(c) for c in COMMANDS]
    assert any(c.args == [] for c in RUN_COMMANDS)  # the default run


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=[f"{i}" for i in range(len(RUN_COMMANDS))])
def test_every_readme_run_command_composes(command, monkeypatch):
    configs = compose_jobs(command, monkeypatch)
    assert configs, command


@pytest.mark.slow
def test_readme_run_commands_run_on_the_embedded_priors(tmp_path, monkeypatch):
    """The runnable commands, two at a time (one OpenMP thread each)."""
    todo = []
    for i, command in enumerate(RUN_COMMANDS):
        configs = compose_jobs(command, monkeypatch)
        if "--cfg" in command.args:
            todo.append((command, command.args, None, command.env))
        elif runnable(command, configs):
            folder = tmp_path / f"command{i}"
            todo.append((command, with_budget(command.args, configs, folder), (folder, len(configs)), command.env))
    assert len(todo) >= 5, [str(c) for c, *_ in todo]  # the default, the examples, a sweep, --cfg job
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda t: run_script("run.py", t[1], t[3]), todo))
    for (command, args, expected, _), proc in zip(todo, procs, strict=True):
        assert proc.returncode == 0, f"{command}\n{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if expected is None:  # --cfg: the composed config is printed
            assert "solver:" in proc.stdout, command
            continue
        folder, num_jobs = expected
        summaries = sorted(folder.rglob("summary.json"))
        assert len(summaries) == num_jobs, command
        for path in summaries:
            summary = json.loads(path.read_text())
            assert summary["num_images"] == 1 and summary["num_failed"] == 0, (command, path)


@functools.lru_cache
def script_help(script: str) -> str:
    proc = run_script(script, ["--help"])
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", OTHER_COMMANDS, ids=[f"{c.script}-{i}" for i, c in enumerate(OTHER_COMMANDS)])
def test_readme_script_options_exist(command):
    """A script's documented options are the ones its parser knows (running them needs a sweep or a GPU)."""
    help_text = script_help(command.script)
    for option in (a.split("=", 1)[0] for a in command.args if a.startswith("--")):
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", help_text), f"{command}: {option} not in --help"
