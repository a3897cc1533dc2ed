"""Scale-out: shards of a cell, their merge in make_table, the sweep status, GPU claims, the launchers."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, compose_config, read_jsonl
from hydra.utils import instantiate

from g2d2.data import shard_range
from g2d2.experiment import devices
from g2d2.experiment.runner import ConfigError, exclusive_folder, run
from g2d2.experiment.tables import TableError, build_tables, load_summaries, load_unfinished, to_markdown

pytestmark = pytest.mark.usefixtures("one_thread")

MAKE_TABLE = ROOT / "scripts" / "make_table.py"
QUIET = ["logger=none", "progress=false", "device=cpu"]
COST_KEYS = ("seconds", "peak_gpu_mem_mb", "peak_rss_mb")


def without_cost(records):
    return [{k: v for k, v in r.items() if k not in COST_KEYS} for r in records]


# ------------------------------------------------------------------------------------------------ shards


@pytest.mark.parametrize("count", [1, 3, 7, 1000])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_shards_are_contiguous_blocks_covering_every_index_once(count, num_shards):
    if num_shards > count:
        return
    blocks = [shard_range(count, i, num_shards) for i in range(num_shards)]
    assert [i for block in blocks for i in block] == list(range(count))  # in order, each index once
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_two_shards_give_the_numbers_and_the_table_entry_of_the_whole_cell(tmp_path):
    """G2D2 on the tiny VQ prior, random inpainting masks, 3 images: shard 0 (image 0) and shard 1 (images 1, 2)
    write exactly the records, operator draws and reconstructions of the unsharded run, under the same indices,
    and make_table's merged cell is the unsharded cell's entry."""
    args = ["+method=g2d2_tiny", "task=inpaint_random", "data.limit=3", "batch_size=1", "solver.num_steps=2",
            "solver.inner_iters=1", *QUIET]
    choices = {"task": "inpaint_random", "method": "g2d2_tiny", "solver": "g2d2", "prior": "tiny_vq"}
    whole = tmp_path / "whole" / "0_inpaint_random_g2d2_tiny"
    summary = run(compose_config(args), whole, choices=choices)
    assert summary["num_expected"] == 3 and summary["shard"] == {"shard": 0, "num_shards": 1, "start": 0, "stop": 3,
                                                                 "cell_images": 3}
    parts = [tmp_path / "shards" / f"inpaint_random_g2d2_tiny_shard{i}" for i in (0, 1)]
    for i, folder in enumerate(parts):
        part = run(compose_config([*args, f"data.shard={i}", "data.num_shards=2"]), folder, choices=choices)
        assert part["num_expected"] == (1, 2)[i] and part["config"]["data"]["shard"] == i
        assert json.loads((folder / "shard.json").read_text()) == part["shard"]
        assert json.loads((folder / "run_config.json").read_text())["data"]["num_shards"] == 2

    records = without_cost(read_jsonl(whole / "metrics.jsonl"))
    sharded = [without_cost(read_jsonl(folder / "metrics.jsonl")) for folder in parts]
    assert [r["index"] for r in sharded[0]] == [0] and [r["index"] for r in sharded[1]] == [1, 2]
    assert sharded[0] + sharded[1] == records  # every image's PSNR / SSIM / LPIPS, name and index, bit for bit
    for sub in ("operators", "images"):
        files = {p.name: p.read_bytes() for p in sorted((whole / sub).iterdir())}
        shard_files = {p.name: p.read_bytes() for folder in parts for p in sorted((folder / sub).iterdir())}
        assert shard_files == files and files  # e.g. operators/00002.safetensors, images/00002_coffee_recon.png

    [one] = build_tables(load_summaries(tmp_path / "whole"))
    [merged] = build_tables(load_summaries(tmp_path / "shards"))
    metrics = ["psnr", "ssim", "lpips"]
    assert to_markdown(merged, metrics) == to_markdown(one, metrics)
    assert "| g2d2 (tiny_vq) | 3 |" in to_markdown(merged, metrics)  # images per cell: complete, not partial
    cell, cell_whole = merged.rows[0].cells["inpaint_random"], one.rows[0].cells["inpaint_random"]
    numbers = lambda cells: {m: (c.mean, c.std, c.n) for m, c in cells.items()}  # noqa: E731
    assert numbers(cell) == numbers(cell_whole)
    assert merged.merged == {"g2d2 (tiny_vq) / inpaint_random": [str(p) for p in parts]} and not one.merged


@pytest.mark.parametrize("shard, num_shards", [(2, 2), (-1, 2), ("a", 2), (0, 0), (True, 2), (0, 1.5)])
def test_bad_shard_values_are_one_clear_error_before_anything_is_built(tmp_path, shard, num_shards):
    cfg = compose_config(["solver=pinv", "task=denoise", *QUIET, "data.limit=1"])
    cfg.data.shard, cfg.data.num_shards = shard, num_shards
    with pytest.raises(ConfigError, match=r"data.shard must be an integer in 0 .. data.num_shards-1 .*got data.shard="):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_more_shards_than_images_and_a_changed_shard_on_resume_are_refused(tmp_path):
    args = ["solver=pinv", "task=denoise", "save_images=false", *QUIET]
    with pytest.raises(ConfigError, match="data.num_shards=5 but the data selects 4 images.*data.num_shards <= 4"):
        run(compose_config([*args, "data.shard=4", "data.num_shards=5"]), tmp_path / "five")
    assert not any((tmp_path / "five").iterdir())  # no .lock, nothing written
    run(compose_config([*args, "data.shard=0", "data.num_shards=2"]), tmp_path / "out")
    with pytest.raises(ConfigError, match=r"the config changed \(data.num_shards: 2 -> 3\)"):
        run(compose_config([*args, "data.shard=0", "data.num_shards=3", "resume=true"]), tmp_path / "out")


# ------------------------------------------------------------------------------------------ make_table merge


def shard_folder(root, name, shard, num_shards, psnr: dict[int, float], cell_images, sigma=0.05, summary=True):
    """A finished (or, summary=False, unfinished) shard of the pinv / sr4 cell with the given per-image PSNR."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    config = {"experiment_name": "t", "lpips_net": "vgg", "seed": 0, "task": {"name": "sr4", "sigma": sigma},
              "data": {"name": "ffhq", "shard": shard, "num_shards": num_shards},
              "solver": {"_target_": "g2d2.solvers.pinv.PseudoInverse"}}
    choices = {"task": "sr4", "method": "pinv", "solver": "pinv", "prior": None, "data": "ffhq"}
    records = [{"index": i, "name": f"{i:05d}.png", "status": "ok", "psnr": p, "ssim": 0.5, "lpips": 0.2}
               for i, p in psnr.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "run_config.json").write_text(json.dumps(config))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    block = shard_range(cell_images, shard, num_shards)
    info = {"shard": shard, "num_shards": num_shards, "start": block.start, "stop": block.stop,
            "cell_images": cell_images}
    (folder / "shard.json").write_text(json.dumps(info))
    if summary:
        from g2d2.experiment.results import summarize

        data = summarize(records)
        data.update(num_expected=len(block), shard=info, config=config, choices=choices)
        (folder / "summary.json").write_text(json.dumps(data))
    return folder


def test_merged_cell_is_over_the_union_of_records_and_missing_shards_make_it_partial(tmp_path):
    shard_folder(tmp_path, "a", 0, 3, {0: 20.0}, cell_images=5)  # shards of 5 images: [0, 1), [1, 3), [3, 5)
    shard_folder(tmp_path, "b", 1, 3, {1: 30.0, 2: 34.0}, cell_images=5)
    [table] = build_tables(load_summaries(tmp_path))
    union = [20.0, 30.0, 34.0]  # mean 28; the mean of the shard means would be 26
    cell = table.rows[0].cells["sr4"]["psnr"]
    assert (cell.mean, cell.std, cell.n) == (statistics.fmean(union), statistics.stdev(union), 3)
    md = to_markdown(table, ["psnr"])
    assert f"| pinv | 28.00 ± {statistics.stdev(union):.2f}‡ |" in md
    assert "| pinv | 3/5 |" in md and "‡ partial" in md  # shard 2 of 3 never ran: 3 of the cell's 5 images


def test_overlapping_shards_and_different_protocols_are_refused_by_name(tmp_path):
    shard_folder(tmp_path / "overlap", "a", 0, 2, {0: 20.0, 1: 21.0}, cell_images=4)
    shard_folder(tmp_path / "overlap", "b", 1, 3, {1: 21.0}, cell_images=4)  # another num_shards: image 1 twice
    with pytest.raises(TableError, match=r"image 1 of pinv / sr4 is in two runs: .*overlap/a and .*overlap/b"):
        build_tables(load_summaries(tmp_path / "overlap"))
    shard_folder(tmp_path / "sigma", "a", 0, 2, {0: 20.0}, cell_images=2)
    shard_folder(tmp_path / "sigma", "b", 1, 2, {1: 21.0}, cell_images=2, sigma=0.1)
    with pytest.raises(TableError, match=r"two shards of pinv / sr4 differ in task\.sigma: .*sigma/a and .*sigma/b"):
        build_tables(load_summaries(tmp_path / "sigma"))


def test_an_unfinished_shard_is_named_and_left_out_and_wandb_names_the_merged_folders(tmp_path):
    sweep = tmp_path / "sweep"
    a = shard_folder(sweep, "a", 0, 2, {0: 20.0}, cell_images=2)
    shard_folder(sweep, "b", 1, 2, {}, cell_images=2, summary=False)
    [table] = build_tables(load_summaries(sweep), unfinished=load_unfinished(sweep))
    md = to_markdown(table, ["psnr"])
    assert "| pinv | 20.00‡ |" in md and "| pinv | 1/2 |" in md
    assert "Unfinished shard 1 of 2 of pinv / sr4" in md
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, str(MAKE_TABLE), str(sweep), "--no-published", "--wandb", "offline"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [record] = (sweep / "wandb").glob("offline-run-*/run-*.wandb")  # the run's config, its values as JSON inside
    value = json.dumps({"pinv / sr4": [str(a)]}, separators=(",", ":")).encode()
    assert b"merged_shards" in record.read_bytes() and value in record.read_bytes()


# ----------------------------------------------------------------------------------------------- status


def snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_status_reports_every_shard_without_touching_a_run_folder(tmp_path):
    from g2d2.experiment.status import lock_held, status_report

    shard_folder(tmp_path, "sr4_pinv_shard0", 0, 4, {0: 20.0, 1: 21.0}, cell_images=8)
    running = shard_folder(tmp_path, "sr4_pinv_shard1", 1, 4, {2: 20.0}, cell_images=8, summary=False)
    killed = shard_folder(tmp_path, "sr4_pinv_shard2", 2, 4, {4: 20.0}, cell_images=8, summary=False)
    with open(killed / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"index": 5, "status": "nonfinite", "error": "NaN"}) + "\n")
    (killed / ".lock").touch()  # left by a killed run: not held
    (tmp_path / ".submitit" / "123").mkdir(parents=True)  # submitit's logs: not a run
    with exclusive_folder(running):
        before = snapshot(tmp_path)
        assert lock_held(running) and not lock_held(killed) and not lock_held(tmp_path / "sr4_pinv_shard0")
        report = status_report(tmp_path)
        assert snapshot(tmp_path) == before  # nothing created, written or removed
    lines = report.splitlines()
    assert lines[0] == f"{tmp_path}: 4 runs (1 done, 1 running, 1 unfinished, 1 missing); 1 images failed"
    rows = {line.split()[4]: line.split()[3:] for line in lines[2:6]}  # state -> columns after "sr4 / pinv"
    assert rows["done"] == ["0/4", "done", "2/2", "0", "sr4_pinv_shard0"]
    assert rows["running"] == ["1/4", "running", "1/2", "0", "sr4_pinv_shard1"]
    assert rows["unfinished"] == ["2/4", "unfinished", "2/2", "1", "sr4_pinv_shard2"]
    assert rows["missing"] == ["3/4", "missing", "–", "0", "–"]
    assert lines[-1] == "  task=sr4 method=pinv data.shard=2,3"
    proc = subprocess.run([sys.executable, str(MAKE_TABLE), str(tmp_path), "--status"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0  # the lock is released now: the run that held it counts as unfinished
    counts = "4 runs (1 done, 0 running, 2 unfinished, 1 missing); 1 images failed"
    assert proc.stdout.splitlines()[0] == f"{tmp_path}: {counts}"
    assert proc.stdout.splitlines()[-1] == "  task=sr4 method=pinv data.shard=1,2,3"


# ---------------------------------------------------------------------------------------- GPUs and launchers


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_concurrent_auto_runs_claim_distinct_gpus_and_a_released_one_is_reused(tmp_path, two_gpus, caplog):
    with devices.claim_device("auto", tmp_path) as first, devices.claim_device("auto", tmp_path) as second:
        assert (first, second) == (torch.device("cuda", 0), torch.device("cuda", 1))
        with caplog.at_level("WARNING"), devices.claim_device("auto", tmp_path) as third:
            assert third == torch.device("cuda", 0)  # all held: shares the first, as before claims existed
        assert "all 2 visible GPUs are held" in caplog.text
    with devices.claim_device("auto", tmp_path) as again:
        assert again == torch.device("cuda", 0)  # released at the end of the first block
    with devices.claim_device("auto", tmp_path), devices.claim_device("auto", tmp_path) as other:
        assert other == torch.device("cuda", 1)


def test_explicit_devices_and_cuda_visible_devices_are_honoured(tmp_path, two_gpus, monkeypatch):
    with devices.claim_device("cuda:1", tmp_path) as device, devices.claim_device("cpu", tmp_path) as cpu:
        assert (device, cpu) == (torch.device("cuda", 1), torch.device("cpu"))
    assert not list(tmp_path.iterdir())  # an explicit device claims nothing
    with pytest.raises(devices.DeviceError, match="device=cuda:2 but only 2 GPU"):
        with devices.claim_device("cuda:2", tmp_path):
            pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # e.g. set by SLURM: indices 0, 1 are physical GPUs 5, 7
    with devices.claim_device("auto", tmp_path) as device:
        assert device == torch.device("cuda", 0) and (tmp_path / "gpu-5.lock").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with devices.claim_device("auto", tmp_path) as device:
        assert device == torch.device("cpu")
    with pytest.raises(devices.DeviceError, match="CUDA is not available; use device=cpu or device=auto"):
        with devices.claim_device("cuda", tmp_path):
            pass


def test_gpus_launcher_runs_one_joblib_process_per_gpu():
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    cfg = compose_config(["+experiment=tiny_table", "hydra/launcher=gpus", "hydra.launcher.n_jobs=4"],
                         return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, JoblibLauncher)
    assert launcher.joblib["n_jobs"] == 4 and launcher.joblib["prefer"] == "processes"
    assert cfg.device == "auto"  # each job claims a free GPU
    assert compose_config(["hydra/launcher=gpus"], return_hydra_config=True).hydra.launcher.n_jobs == 1


def test_slurm_launcher_requeues_and_the_recipe_gives_each_shard_a_stable_folder(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    subdir = "hydra.sweep.subdir=${hydra.runtime.choices.task}_${hydra.runtime.choices.method}_shard${data.shard}"
    cfg = compose_config(["+experiment=tiny_table", "hydra/launcher=slurm", "task=sr4", "method=pinv",
                          "data.shard=3", "data.num_shards=8", "resume=true", subdir, f"hydra.sweep.dir={tmp_path}"],
                         return_hydra_config=True)
    assert cfg.hydra.sweep.subdir == "sr4_pinv_shard3"  # not the job number: a resubmitted subset finds its folder
    launcher = instantiate(cfg.hydra.launcher)
    assert launcher.params["max_num_timeout"] >= 1 and launcher.params["signal_delay_s"] == 120
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    # as SlurmLauncher.launch builds its executor: max_num_timeout is an init argument
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "s",
                                     slurm_max_num_timeout=launcher.params["max_num_timeout"])
    assert executor._executor.max_num_timeout == launcher.params["max_num_timeout"]
    executor.update_parameters(slurm_signal_delay_s=launcher.params["signal_delay_s"])
    assert "#SBATCH --signal=USR2@120" in executor._executor._make_submission_file_text("python x.py", "uid")
    # on USR2, submitit resubmits the launcher's checkpoint: the same call, so the same job number and folder
    args = (["task=sr4"], "hydra.sweep.dir", 5, "job_id_for_5", {})
    again = launcher.checkpoint(*args)
    assert again.function is launcher and again.args == args


def test_sigterm_handler_is_left_to_submitit_when_it_has_one():
    from g2d2.experiment import cli

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cli.handle_sigterm()
        assert signal.getsignal(signal.SIGTERM) is cli.exit_on_sigterm

        def submitit_bypass(signum, frame):
            pass

        signal.signal(signal.SIGTERM, submitit_bypass)
        cli.handle_sigterm()
        assert signal.getsignal(signal.SIGTERM) is submitit_bypass
    finally:
        signal.signal(signal.SIGTERM, before)
