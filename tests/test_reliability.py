"""Reliability of scripts/run.py: reproducibility, resuming, numerical guards, input validation and
safe checkpoint loading, through the real entry point on the embedded tiny priors.

Every subprocess here runs with OMP_NUM_THREADS=1: on a busy 2-core machine two OpenMP threads per
process make each tiny-UNet call up to 50x slower (spin-waiting), and the thread count is part of
what bit-identical results depend on (all runs compared with each other use the same count).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import ROOT, RUN
from safetensors.torch import load_file

from g2d2.experiment.results import summarize

#: per-image fields that measure cost, not quality: they legitimately differ between two runs
TIMING_KEYS = ("seconds", "peak_rss_mb", "peak_gpu_mem_mb")
QUALITY = ("psnr", "ssim", "lpips")
QUIET = ["logger=none", "progress=false"]
#: three real prior solvers, 3 images in batches of 2 (the second batch is partial), tiny budgets
COMMON = ["task=inpaint_box", "data.limit=3", "batch_size=2", "solver.num_steps=2", *QUIET]
METHODS = "+method=g2d2_tiny,red_diff_tiny,dps_tiny"
RED_DIFF = ["+method=red_diff_tiny", *COMMON]


def cli(args: list[str], run_dir: Path | None = None, sweep_dir: Path | None = None, check: bool = True,
        popen: bool = False, timeout: float = 300):
    """`python scripts/run.py <args>` with fixed output folders, W&B off and one OpenMP thread."""
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    dirs = [f"hydra.run.dir={run_dir}"] if run_dir else []
    dirs += [f"hydra.sweep.dir={sweep_dir}"] if sweep_dir else []
    cmd = [sys.executable, str(RUN), *args, *dirs]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]


def quality_summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "num_images": summary["num_images"],
        "num_failed": summary["num_failed"],
        "metrics": {k: summary["metrics"][k] for k in QUALITY},
    }


def operators(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted((run_dir / "operators").iterdir())}


def strict_json(path: Path) -> dict:
    """json.loads refusing NaN / Infinity tokens."""
    def refuse(token):
        raise AssertionError(f"{path} holds {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Sweep a and b: the same command (G2D2, RED-Diff, DPS); c: RED-Diff with seed=1."""
    root = tmp_path_factory.mktemp("repro")
    with ThreadPoolExecutor(3) as pool:  # three processes side by side: one OpenMP thread each
        jobs = [
            pool.submit(cli, ["-m", METHODS, *COMMON], sweep_dir=root / "a"),
            pool.submit(cli, ["-m", METHODS, *COMMON], sweep_dir=root / "b"),
            pool.submit(cli, [*RED_DIFF, "seed=1"], run_dir=root / "c"),
        ]
        for job in jobs:
            job.result()
    return {"a": root / "a", "b": root / "b", "c": root / "c", "root": root}


def red_diff_job(sweep: Path) -> Path:
    (job,) = sweep.glob("*_red_diff")
    return job


# ----------------------------------------------------------------------------- 1. reproducibility
def test_same_command_gives_bit_identical_results(runs):
    jobs_a = sorted(p for p in runs["a"].iterdir() if p.is_dir())
    assert {strict_json(p / "summary.json")["choices"]["solver"] for p in jobs_a} == {"g2d2", "red_diff", "dps"}
    for job_a in jobs_a:
        job_b = runs["b"] / job_a.name
        first, second = records(job_a), records(job_b)
        assert [r["index"] for r in first] == [0, 1, 2] and all(r["status"] == "ok" for r in first)
        assert without_timing(first) == without_timing(second), job_a.name  # psnr / ssim / lpips exactly equal
        assert quality_summary(job_a) == quality_summary(job_b)
        # what each run drew: the operators (box masks) and the measurements, saved only as safetensors
        ops_a, ops_b = operators(job_a), operators(job_b)
        assert list(ops_a) == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]  # one per image
        for name in ops_a:
            assert ops_a[name].keys() == ops_b[name].keys() == {"mask"}
            assert all(torch.equal(ops_a[name][k], ops_b[name][k]) for k in ops_a[name])
        for png in sorted((job_a / "images").glob("*.png")):  # measurement views and reconstructions
            assert png.read_bytes() == (job_b / "images" / png.name).read_bytes(), png.name
        config_a, config_b = (json.loads((j / "run_config.json").read_text()) for j in (job_a, job_b))
        assert config_a == config_b
        # provenance: versions and the git commit of the checkout
        environment = strict_json(job_a / "summary.json")["environment"]
        assert environment["versions"]["torch"] == metadata.version("torch")
        assert all(environment["versions"][p] for p in ("g2d2", "diffusers", "hydra-core", "lpips"))
        assert environment["torch_threads"] == 1
        assert "git_commit" in environment
        if (ROOT / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", environment["git_commit"]), environment["git_commit"]


def test_different_seed_draws_different_masks_and_noise(runs):
    a, c = red_diff_job(runs["a"]), runs["c"]
    config_a = json.loads((a / "run_config.json").read_text())
    config_c = json.loads((c / "run_config.json").read_text())
    assert config_a.pop("seed") == 0 and config_c.pop("seed") == 1 and config_a == config_c
    ops_a, ops_c = operators(a), operators(c)
    assert list(ops_a) == list(ops_c)
    for name in ops_a:
        assert not torch.equal(ops_a[name]["mask"], ops_c[name]["mask"]), name
    for png in sorted((a / "images").glob("*_measurement.png")):  # the view of y: other mask, other noise
        assert png.read_bytes() != (c / "images" / png.name).read_bytes(), png.name
    assert all(
        (ra["psnr"], ra["ssim"]) != (rc["psnr"], rc["ssim"]) for ra, rc in zip(records(a), records(c), strict=True)
    )


# ----------------------------------------------------------------------------- 2. resume
def _interrupted_copy(runs, name: str, keep_lines: int, partial: bool) -> tuple[Path, Path, bytes]:
    """A copy of the finished RED-Diff run whose metrics.jsonl keeps its first lines (+ half the next)."""
    reference = red_diff_job(runs["a"])
    target = runs["root"] / name
    shutil.copytree(reference, target)
    lines = (reference / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    kept = b"".join(lines[:keep_lines])
    (target / "metrics.jsonl").write_bytes(kept + (lines[keep_lines][:40] if partial else b""))
    (target / "summary.json").unlink()
    return reference, target, kept


def test_resume_skips_finished_images_and_matches_an_uninterrupted_run(runs):
    reference, target, kept = _interrupted_copy(runs, "resume_batch", keep_lines=2, partial=False)
    proc = cli([*RED_DIFF, "resume=true"], run_dir=target)
    assert "resuming: 2 of 3 images already finished" in proc.stdout + proc.stderr
    after = (target / "metrics.jsonl").read_bytes()
    assert after.startswith(kept)  # the finished images were skipped, their lines untouched
    assert [r["index"] for r in records(target)] == [0, 1, 2]
    assert without_timing(records(target)) == without_timing(records(reference))
    assert quality_summary(target) == quality_summary(reference)


def test_resume_repairs_a_partial_line_inside_a_batch(runs):
    # killed while writing image 1's line: image 0 of batch [0, 1] is done, image 1 is half a line
    reference, target, kept = _interrupted_copy(runs, "resume_partial", keep_lines=1, partial=True)
    proc = cli([*RED_DIFF, "resume=true"], run_dir=target)
    log = proc.stdout + proc.stderr
    assert "partial or corrupt line" in log and "resuming: 1 of 3 images" in log
    assert (target / "metrics.jsonl").read_bytes().startswith(kept)
    assert [r["index"] for r in records(target)] == [0, 1, 2]  # valid JSON lines, each image once
    # image 1 is solved again inside its original batch [0, 1] (same generator), so the numbers match
    assert without_timing(records(target)) == without_timing(records(reference))
    assert quality_summary(target) == quality_summary(reference)


def test_resume_refuses_a_changed_config(runs):
    _, target, kept = _interrupted_copy(runs, "resume_changed", keep_lines=2, partial=False)
    proc = cli([*RED_DIFF, "resume=true", "seed=1"], run_dir=target, check=False)
    assert proc.returncode != 0
    assert "the config changed (seed: 0 -> 1)" in proc.stderr and "new folder" in proc.stderr
    assert (target / "metrics.jsonl").read_bytes() == kept


@pytest.mark.slow
def test_sigkill_between_images_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["+method=red_diff_tiny", "task=inpaint_box", "data.limit=4", "batch_size=1", "solver.num_steps=20",
            *QUIET]
    pool = ThreadPoolExecutor(1)
    full = pool.submit(cli, args, run_dir=tmp_path / "full")  # the uninterrupted run, side by side
    killed = tmp_path / "killed"
    proc = cli(args, run_dir=killed, popen=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (metrics.exists() and metrics.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, "the run ended before its first image was written"
            assert time.monotonic() < deadline, "no image finished within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    finished = metrics.read_bytes().count(b"\n")  # complete lines; the last one may be half written
    assert 1 <= finished < 4, f"the kill came too late ({finished} images finished)"
    assert not (killed / "summary.json").exists()
    full.result()
    pool.shutdown()
    out = cli([*args, "resume=true"], run_dir=killed)
    assert f"resuming: {finished} of 4 images" in out.stdout + out.stderr
    assert [r["index"] for r in records(killed)] == [0, 1, 2, 3]
    assert without_timing(records(killed)) == without_timing(records(tmp_path / "full"))
    assert quality_summary(killed) == quality_summary(tmp_path / "full")


# ----------------------------------------------------------------------------- 3. numerical guards
def test_diverging_solver_fails_its_images_and_the_sweep_goes_on(tmp_path):
    # Adam with lr 1e30 puts mu at ~1e30 after one step; the squared residual then overflows float32
    args = ["-m", "+method=red_diff_tiny", "task=inpaint_box", "data.limit=2", "batch_size=1",
            "solver.num_steps=3", "solver.lr=1e30,0.25", *QUIET]
    cli(args, sweep_dir=tmp_path)  # exit status 0
    jobs = {strict_json(p)["config"]["solver"]["lr"]: p.parent for p in tmp_path.glob("*/summary.json")}
    assert set(jobs) == {1e30, 0.25}
    bad, good = jobs[1e30], jobs[0.25]
    summary = strict_json(bad / "summary.json")  # no NaN / Infinity anywhere
    assert summary["num_images"] == 0 and summary["num_failed"] == 2
    assert [f["index"] for f in summary["failed"]] == [0, 1]
    assert all("RED-Diff estimate mu became NaN/Inf between steps 0 and 2" in f["error"] for f in summary["failed"])
    assert all(summary["metrics"][k] == {"mean": None, "std": None, "count": 0, "excluded": 0} for k in QUALITY)
    assert [r["status"] for r in records(bad)] == ["nonfinite", "nonfinite"]
    assert not list((bad / "images").glob("*_recon.png"))
    log = (bad / "run.log").read_text()
    assert "ERROR" in log and "image 0 (astronaut) failed: RED-Diff estimate mu became NaN/Inf" in log
    ok = strict_json(good / "summary.json")
    assert ok["num_images"] == 2 and ok["num_failed"] == 0
    assert all(isinstance(ok["metrics"][k]["mean"], float) for k in QUALITY)


def test_summary_mixes_finished_and_failed_images_without_nan():
    rs = [
        {"index": 1, "name": "b", "status": "nonfinite", "error": "mu became NaN/Inf", "seconds": 1.0},
        {"index": 0, "name": "a", "status": "ok", "psnr": 20.0, "ssim": 0.5, "lpips": float("nan"), "seconds": 2.0},
        {"index": 2, "name": "c", "status": "ok", "psnr": 22.0, "ssim": 0.7, "lpips": 0.25, "seconds": 4.0},
        {"index": 3, "name": "d", "status": "ok", "psnr": float("inf"), "ssim": 1.0, "lpips": 0.0, "seconds": 3.0},
    ]
    summary = summarize(rs)
    json.dumps(summary, allow_nan=False)
    assert summary["num_images"] == 3 and summary["num_failed"] == 1
    assert summary["failed"] == [{"index": 1, "name": "b", "error": "mu became NaN/Inf"}]
    # a perfect reconstruction's PSNR (inf) and a NaN LPIPS are left out of the means, and counted
    assert summary["metrics"]["psnr"] == {"mean": 21.0, "std": pytest.approx(2**0.5), "count": 2, "excluded": 1}
    assert summary["metrics"]["lpips"] == {"mean": 0.125, "std": pytest.approx(0.125 * 2**0.5), "count": 2,
                                           "excluded": 1}
    assert summary["metrics"]["seconds"]["mean"] == 3.0  # failed images do not enter the cost means


# ----------------------------------------------------------------------------- 4. input validation
def _refused(args: list[str], tmp_path: Path) -> str:
    proc = cli(["data.limit=1", *QUIET, *args], run_dir=tmp_path / "run", check=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
    return proc.stderr


def test_unknown_config_key_is_refused_by_hydra(tmp_path):
    err = _refused(["solver.no_such_option=1"], tmp_path)
    assert "Could not override 'solver.no_such_option'" in err


def test_image_size_other_than_the_vq_prior_is_refused(tmp_path):
    err = _refused(["data.image_size=48"], tmp_path)
    assert "VQDiffusionPrior makes 64 px images but data.image_size=48" in err


def test_pixel_prior_size_not_divisible_by_the_unet_factor_is_a_clear_error(tmp_path):
    err = _refused(["+method=red_diff_tiny", "task=denoise", "data.image_size=50", "prior.image_size=50",
                    "solver.num_steps=1"], tmp_path)
    assert "50" in err and ("multiple" in err or "divisible" in err)


def test_missing_checkpoint_path_is_refused(tmp_path):
    err = _refused([f"prior.path={tmp_path / 'nonexistent'}"], tmp_path)
    assert f"checkpoint path '{tmp_path / 'nonexistent'}' does not exist" in err


def _wrong_keys_pt(tmp_path: Path) -> Path:
    path = tmp_path / "wrong_keys.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(8, 3, 3, 3), "label_emb.weight": torch.zeros(10, 32)}, path)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prior.path=embedded:tiny_ddpm"], "has no 'vqvae/' folder"),  # the VQ prior given the DDPM folder
        (["+method=red_diff_tiny", "prior.path=embedded:tiny_vq"], "is not a DDPM checkpoint folder"),
        (["+method=red_diff_tiny", "prior.path=WRONG_KEYS"], "matches none of the known guided-diffusion"),
    ],
    ids=["vq_prior_on_ddpm_folder", "ddpm_prior_on_vq_folder", "guided_diffusion_pt_with_wrong_keys"],
)
def test_checkpoint_of_the_wrong_architecture_is_refused(tmp_path, args, message):
    args = [a.replace("WRONG_KEYS", str(_wrong_keys_pt(tmp_path))) for a in args]
    assert message in _refused(args, tmp_path)


# ----------------------------------------------------------------------------- 5. safe loading
class _Payload:
    """Unpickling this runs os.makedirs(marker): what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    from g2d2.priors.checkpoints import CheckpointError
    from g2d2.priors.guided_diffusion import load_adm_unet
    from g2d2.priors.pixel import DDPMPrior

    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(8, 3, 3, 3), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_adm_unet(path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        DDPMPrior(str(path))
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(path)  # torch >= 2.6 default, which also covers the lpips package's own torch.load
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.is_dir()


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call `<x>.<name>(...)` / `<name>(...)` in g2d2/ and scripts/."""
    found = []
    for path in sorted([*(ROOT / "g2d2").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
                if called == name.split(".")[-1] and (owner == name.split(".")[0] or "." not in name):
                    found.append((path.relative_to(ROOT), node))
    return found


def _keyword(call: ast.Call, name: str):
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


def test_every_torch_load_is_weights_only():
    calls = _calls("torch.load")
    assert calls, "found no torch.load call: is the scan broken?"
    for path, call in calls:
        assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno} torch.load without weights_only=True"
    assert not _calls("pickle.load") and not _calls("pickle.loads")


#: torch.save is allowed only where a .pt is not a weights release: the training-resume state
#: (model + optimiser + generator, read back with weights_only=True) and the torchvision trunk
#: file LPIPS reads from the torch hub cache under torchvision's own .pth name
TORCH_SAVE_ALLOWED = {Path("g2d2/train/loop.py"), Path("g2d2/experiment/lpips_weights.py")}


def test_weights_are_written_as_safetensors():
    for path, call in _calls("torch.save"):
        assert path in TORCH_SAVE_ALLOWED, f"{path}:{call.lineno} writes a torch pickle; use safetensors"
    for path, call in _calls("save_pretrained"):
        assert _keyword(call, "safe_serialization") is not False, f"{path}:{call.lineno} safe_serialization=False"
    weights = ROOT / "g2d2" / "priors" / "weights"
    suffixes = {p.suffix for p in weights.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json"}, suffixes
    assert ".safetensors" in suffixes
