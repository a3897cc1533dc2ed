"""The layout of conf/ may change, the composed job configs may not: every run below must compose to the job
config recorded in tests/fixtures/config_layout.json (resolved, the `hydra` node left out).

The runs: the default run, every cell of every conf/experiment/*.yaml sweep, every job of README's
`scripts/run.py` commands and every method on every task, each with the overrides it was recorded with.
`NEW_SPELLING` maps the recorded overrides that conf/ no longer accepts to the command that replaces them.

An intended change of a composed value: regenerate the fixture with `python tests/test_config_layout.py --write`
and say in the commit which values changed.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import CONF, compose_config
from omegaconf import OmegaConf

FIXTURE = Path(__file__).parent / "fixtures" / "config_layout.json"
#: env-dependent paths get fixed values, so the fixture does not depend on the machine
ENV = {
    "G2D2_FFHQ_DIR": "/env/ffhq", "G2D2_IMAGENET_DIR": "/env/imagenet", "G2D2_IMAGENET_LIST": "/env/list.txt",
    "G2D2_ADM_FFHQ": "/env/ffhq_10m.pt", "G2D2_ADM_IMAGENET": "/env/adm_imagenet.pt",
}
#: top-level keys that conf/ no longer has, left out of the comparison (they were read by other keys only)
REMOVED_KEYS = ("dps_scale_by_task",)  # DPS's ImageNet deblur scales: conf/setting/dps_adm_imagenet/
#: recorded overrides -> the overrides that compose the same job config in today's conf/ (none yet: every
#: recorded command is spelled as it was)
NEW_SPELLING: dict[tuple[str, ...], tuple[str, ...]] = {}


def new_spelling(overrides: list[str]) -> list[str]:
    """The recorded overrides as today's conf/ spells them (longest recorded group of words first)."""
    out, rest = [], list(overrides)
    while rest:
        for size in range(len(rest), 0, -1):
            if tuple(rest[:size]) in NEW_SPELLING:
                out += NEW_SPELLING[tuple(rest[:size])]
                rest = rest[size:]
                break
        else:
            out.append(rest.pop(0))
    return out


def job_config(overrides: list[str]) -> dict:
    """The resolved job config (everything but `hydra`) of `scripts/run.py <overrides>`."""
    cfg = compose_config(overrides, return_hydra_config=True)
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def experiment_cells() -> dict[str, list[str]]:
    """Each job of each experiment's sweep (hydra.sweeper.params expanded), by id."""
    cells = {}
    for experiment in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        cfg = compose_config([f"+experiment={experiment}"], return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params or OmegaConf.create({}))
        keys = list(params)
        for combo in itertools.product(*(str(params[k]).split(",") for k in keys)):
            overrides = [f"+experiment={experiment}", *(f"{k}={v}" for k, v in zip(keys, combo, strict=True))]
            cells[" ".join(overrides)] = overrides
    return cells


def recorded_cases() -> dict[str, list[str]]:
    """The runs to record (called when writing the fixture; README's commands are read as they were then)."""
    from test_readme_commands import RUN_COMMANDS, jobs_of

    class Env:  # jobs_of sets each command's exported variables; ENV fixes them instead
        def setenv(self, key, value):
            pass

    cases = {"default": []}
    cases.update(experiment_cells())
    for command in RUN_COMMANDS:
        for i, job in enumerate(jobs_of(command, Env())):
            seen = [sorted(o for o in overrides if not o.startswith("hydra")) for overrides in cases.values()]
            if sorted(o for o in job if not o.startswith("hydra")) not in seen:  # hydra* does not change the job
                cases[f"readme: {command.text} [job {i}]"] = job
    methods = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    tasks = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    for method, task in itertools.product(methods, tasks):
        cases[f"+method={method} task={task}"] = [f"+method={method}", f"task={task}"]
    return cases


def load_fixture() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {"cases": {}, "configs": {}}


def dotted_keys(config: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys


def without(config: dict, keys: set[str], prefix: str = "") -> dict:
    """config less the dotted keys in `keys`."""
    return {k: without(v, keys, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in config.items() if prefix + k not in keys}


FIXTURE_DATA = load_fixture()
#: every dotted key of a recorded config: a key no recorded config has is an option added to a component
#: yaml since (e.g. a new data option), not a change of the layout, and is left out of the comparison
RECORDED_KEYS = set().union(*map(dotted_keys, FIXTURE_DATA["configs"].values()))


@pytest.fixture(autouse=True)
def fixed_env(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("case", sorted(FIXTURE_DATA["cases"]))
def test_job_config_is_the_recorded_one(case):
    recorded = FIXTURE_DATA["cases"][case]
    overrides = new_spelling(recorded["overrides"])
    expected = without(FIXTURE_DATA["configs"][recorded["config"]], set(REMOVED_KEYS))
    config = job_config(overrides)
    assert without(config, dotted_keys(config) - RECORDED_KEYS) == expected, (case, overrides)


def test_every_experiment_cell_is_recorded():
    recorded = {tuple(new_spelling(c["overrides"])) for c in FIXTURE_DATA["cases"].values()}
    missing = [cell for cell, overrides in experiment_cells().items() if tuple(overrides) not in recorded]
    assert not missing, f"cells without a recorded config (regenerate the fixture?): {missing}"


def write_fixture() -> None:
    os.environ.update(ENV)
    cases, configs = {}, {}
    for case, overrides in recorded_cases().items():
        config = job_config(overrides)
        key = next((k for k, v in configs.items() if v == config), None) or f"c{len(configs)}"
        configs[key] = config
        cases[case] = {"overrides": overrides, "config": key}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"cases": cases, "configs": configs}, indent=1, sort_keys=True) + "\n")
    print(f"{FIXTURE}: {len(cases)} runs, {len(configs)} distinct job configs")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python {sys.argv[0]} --write  (records the job configs of today's conf/)")
    write_fixture()
