"""What a user gets for a bad input: `scripts/run.py` stops before any image is solved, exits with status 2,
prints no traceback, ends stderr with one line naming the key or file, and leaves no run folder behind
(or, when the folder existed, leaves it as it was)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, RUN
from PIL import Image

pytestmark = pytest.mark.slow  # each case is a subprocess of scripts/run.py (about 2 to 6 s)

EMBEDDED = ROOT / "g2d2" / "priors" / "weights"
#: the no-prior solver where the prior does not matter: no diffusers import, no weights to load
PINV = ["solver=pinv", "data.image_size=64"]


def run_cli(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """scripts/run.py as a user runs it (no HYDRA_FULL_ERROR unless `env` sets it), into tmp_path/run."""
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, **(env or {})}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(RUN), "logger=none", "progress=false", *args, f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def folder_of_images(tmp_path: Path, corrupt: bool = False) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (80, 80), (120, 60, 30)).save(folder / "a.png")
    if corrupt:  # the second image: the first must not be solved before the run stops
        (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def finished_folder(tmp_path: Path, run_config: dict, lines: str = '{"index": 0, "status": "ok"}\n') -> None:
    """tmp_path/run holding one finished image of another config, with the files a run leaves."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "run.log").write_text("[...][g2d2.experiment.runner][INFO] - image 0 (astronaut): PSNR 20.00 dB\n")
    (run / ".lock").write_text("")
    (run / ".hydra" / "config.yaml").write_text("seed: 7\n")
    (run / "run_config.json").write_text(json.dumps(run_config))
    (run / "metrics.jsonl").write_text(lines)


def truncated_ddpm(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny_ddpm"
    shutil.copytree(EMBEDDED / "tiny_ddpm", folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def empty_file(tmp_path: Path) -> Path:
    (tmp_path / "empty.pt").write_bytes(b"")
    return tmp_path / "empty.pt"


#: id -> (arguments, setup(tmp_path) or None, what the last stderr line must contain)
CASES: dict[str, tuple[list[str], Callable[[Path], object] | None, str]] = {
    "sigma_nan": (["task.sigma=nan"], None, "task.sigma must be a finite number >= 0"),
    "sigma_inf": (["task.sigma=inf"], None, "got inf; set e.g. task.sigma=0.05"),
    "sigma_text": (["task.sigma=abc"], None, "got 'abc'; set e.g. task.sigma=0.05"),
    "sigma_negative": (["task.sigma=-0.1"], None, "got -0.1; set e.g. task.sigma=0.05"),
    "num_steps_text": (["solver.num_steps=abc"], None, "solver.num_steps must be an integer >= 1, got 'abc'"),
    "num_steps_fraction": (["solver.num_steps=2.5"], None, "solver.num_steps must be an integer >= 1, got 2.5"),
    "batch_size_zero": (["batch_size=0"], None, "batch_size must be an integer >= 1, got 0"),
    "unknown_group_option": (["task=nonexistent"], None, "Could not find 'task/nonexistent'"),
    "method_without_plus": (["method=pinv"], None, "use +method=pinv"),
    "data_path_missing": ([*PINV, "data=folder"], None, "data.path has no value"),
    "data_path_nonexistent": ([*PINV, "data=folder", "data.path={tmp}/nonexistent"], None,
                              "nonexistent does not exist"),
    "data_folder_empty": ([*PINV, "data=folder", "data.path={tmp}/empty"], lambda t: (t / "empty").mkdir(),
                          "holds no images"),
    "corrupt_image_at_index_1": ([*PINV, "data=folder", "data.path={tmp}/images", "batch_size=1"],
                                 lambda t: folder_of_images(t, corrupt=True), "cannot read image {tmp}/images/b.png"),
    "checkpoint_empty": (["+method=red_diff_tiny", "prior.path={tmp}/empty.pt"], empty_file, "empty.pt"),
    "checkpoint_truncated": (["+method=red_diff_tiny", "prior.path={tmp}/tiny_ddpm"], truncated_ddpm, "tiny_ddpm"),
    "lpips_weights_missing": ([*PINV, "TORCH_HOME={tmp}/torch"], None, "install_lpips_weights.py"),
    "resume_changed_config": ([*PINV, "data.limit=1", "resume=true"], lambda t: finished_folder(t, {"seed": 7}),
                              "the config changed"),
    "corrupt_metrics_line": ([*PINV, "resume=true"],
                             lambda t: finished_folder(t, {}, lines='{"index": 0,\n{"index": 1}\n'),
                             "line 1 of 2 is not a JSON record"),
}


def refused(tmp_path: Path, case: str):
    """Set the case up in tmp_path, run it; returns (process, folder listing before, file contents before)."""
    args, setup, _ = CASES[case]
    if setup is not None:
        setup(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = dict(a.split("=", 1) for a in args if a.startswith("TORCH_HOME="))
    args = [a for a in args if not a.startswith("TORCH_HOME=")]
    run = tmp_path / "run"
    before = sorted(p.relative_to(run) for p in run.rglob("*")) if run.exists() else None
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} if run.exists() else {}
    return run_cli(args, tmp_path, env=env), before, snapshot


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, tuple]:
    """Every case, two processes at a time."""
    folders = {case: tmp_path_factory.mktemp(case) for case in CASES}
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda case: refused(folders[case], case), CASES)
        return {case: (folders[case], *result) for case, result in zip(CASES, results, strict=True)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_no_run_folder(case, refusals):
    tmp_path, proc, before, snapshot = refusals[case]
    expected = CASES[case][2].replace("{tmp}", str(tmp_path))
    run = tmp_path / "run"

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, proc.stderr
    if before is None:
        assert not run.exists(), sorted(p.name for p in run.iterdir())
    else:  # an existing folder is left as it was (its log may gain lines)
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
        assert {p: p.read_bytes() for p in snapshot if p.name != "run.log"} == {
            p: b for p, b in snapshot.items() if p.name != "run.log"}


def test_a_run_refused_by_the_folder_lock_leaves_that_folder_alone(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    record = {".hydra/config.yaml": "task:\n  sigma: 0.05\n", ".hydra/overrides.yaml": "- task=sr4\n"}
    for name, text in record.items():
        (run / name).write_text(text)
    with open(run / ".lock", "a") as handle:  # the run that owns the folder
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_cli(["solver=pinv", "task=gauss_deblur", "task.sigma=0.1"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "another run is writing into" in proc.stderr.strip().splitlines()[-1]
    assert {name: (run / name).read_text() for name in record} == record  # not overwritten by the refused run
    assert sorted(p.name for p in run.iterdir()) == [".hydra", ".lock", "run.log"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        proc = run_cli(["solver=pinv"], tmp_path)
    finally:
        run.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Permission denied" in proc.stderr.strip().splitlines()[-1]


def test_hydra_full_error_shows_the_traceback(tmp_path):
    proc = run_cli(["task.sigma=-1"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConfigError: task.sigma must be" in proc.stderr
    assert not (tmp_path / "run").exists()
