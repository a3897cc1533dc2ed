"""End-to-end runs of scripts/run.py with the no-prior solver, and the runner's bookkeeping."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import read_jsonl, run_entry_point
from PIL import Image

from g2d2.experiment.results import MetricsFile, summarize
from g2d2.experiment.tracking import NullLogger

ALL_TASKS = ["sr4", "sr4_avgpool", "gauss_deblur", "motion_deblur", "inpaint_box", "inpaint_random", "cs", "denoise"]
FAST = ["solver=pinv", "logger=none", "data.limit=2", "progress=false"]


@pytest.mark.slow
def test_pinv_sweep_over_every_task_writes_finite_summaries(tmp_path):
    run_entry_point(["-m", f"task={','.join(ALL_TASKS)}", *FAST], tmp_path)
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == len(ALL_TASKS)
    seen = set()
    for path in summaries:
        summary = json.loads(path.read_text())
        seen.add(summary["choices"]["task"])
        assert summary["num_images"] == 2 and summary["num_failed"] == 0 and summary["num_expected"] == 2
        for key in ("psnr", "ssim", "lpips"):
            assert math.isfinite(summary["metrics"][key]["mean"]), (path, key)
        assert summary["environment"]["versions"]["torch"]
        assert summary["config"]["task"]["name"] == summary["choices"]["task"]
        run_dir = path.parent
        assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2
        pngs = sorted(p.name for p in (run_dir / "images").glob("*.png"))
        assert len(pngs) == 6 and any(p.endswith("_recon.png") for p in pngs)
    assert seen == set(ALL_TASKS)
    # the denoising pseudo-inverse is y itself: PSNR of noise std 0.05 on [-1, 1] is about 32 dB
    denoise = next(json.loads(p.read_text()) for p in summaries if "denoise" in p.parent.name)
    assert 30.0 < denoise["metrics"]["psnr"]["mean"] < 34.0


@pytest.mark.slow
def test_same_command_same_numbers_and_different_seed_differs(tmp_path):
    args = [*FAST, "task=inpaint_box", "data.limit=1"]
    first = read_jsonl(run_entry_point(args, tmp_path / "a") and tmp_path / "a" / "run" / "metrics.jsonl")
    second = read_jsonl(run_entry_point(args, tmp_path / "b") and tmp_path / "b" / "run" / "metrics.jsonl")
    other = read_jsonl(run_entry_point([*args, "seed=1"], tmp_path / "c") and tmp_path / "c" / "run" / "metrics.jsonl")
    quality = lambda rs: [(r["psnr"], r["ssim"], r["lpips"]) for r in rs]
    assert quality(first) == quality(second)
    assert quality(first) != quality(other)


def test_sr_factor_not_dividing_size_is_a_clear_error(tmp_path):
    proc = run_entry_point(["task=sr4", "data.image_size=66", *FAST], tmp_path, check=False)
    assert proc.returncode != 0
    assert "factor" in proc.stderr and "66" in proc.stderr


def test_folder_with_grey_and_rgba_images_runs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (80, 70), 128).save(folder / "grey.png")
    Image.new("RGBA", (70, 90), (10, 200, 30, 128)).save(folder / "rgba.png")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "tiny.png")
    proc = run_entry_point(
        [*FAST, "data=folder", f"data.path={folder}", "data.image_size=64", "task=denoise", "data.limit=3"], tmp_path
    )
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["name"] for r in records] == ["grey.png", "rgba.png", "tiny.png"]
    log = proc.stdout + proc.stderr
    assert "converted to RGB" in log
    # one warning for the folder, before the first image is solved
    assert "1 of 3 images are smaller than image_size=64 and are upsampled" in log and "tiny.png (1x1)" in log
    assert log.index("smaller than image_size") < log.index("image 0 (grey.png)")


def test_folder_data_follows_the_prior_image_size(tmp_path):
    from conftest import compose_config

    from g2d2.experiment.runner import ConfigError, run

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (96, 80), (200, 100, 50)).save(folder / "a.png")
    args = ["+method=red_diff_tiny", "data=folder", f"data.path={folder}", "task=denoise", "solver.num_steps=1",
            "logger=none", "progress=false", "save_images=false"]
    cfg = compose_config(args)
    assert cfg.data.image_size is None  # conf/data/folder.yaml: the prior's size unless set
    summary = run(cfg, tmp_path / "out")
    assert summary["num_images"] == 1 and summary["config"]["data"]["image_size"] == 64  # the tiny DDPM's
    with pytest.raises(ConfigError, match="set data.image_size"):
        run(compose_config([*args[1:4], "solver=pinv", "logger=none"]), tmp_path / "pinv")
    assert not (tmp_path / "pinv" / ".lock").exists()  # a failed start leaves no lock file


def test_existing_results_need_resume_flag(tmp_path):
    run_entry_point([*FAST, "task=denoise", "data.limit=1"], tmp_path)
    proc = run_entry_point([*FAST, "task=denoise", "data.limit=1"], tmp_path, check=False)
    assert proc.returncode != 0 and "resume=true" in proc.stderr
    run_entry_point([*FAST, "task=denoise", "data.limit=1", "resume=true"], tmp_path)
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1


@pytest.mark.slow
def test_resume_from_the_folder_alone(tmp_path):
    run_entry_point([*FAST, "task=denoise"], tmp_path)
    folder = tmp_path / "run"
    first = read_jsonl(folder / "metrics.jsonl")
    (folder / "metrics.jsonl").write_text(json.dumps(first[0]) + "\n")  # as if killed after image 0
    (folder / "summary.json").unlink()
    proc = run_entry_point(["--resume", str(folder), "progress=true"], tmp_path)  # its own hydra.run.dir: the same
    assert "resuming: 1 of 2 images" in proc.stdout + proc.stderr
    assert [r["index"] for r in read_jsonl(folder / "metrics.jsonl")] == [0, 1]
    assert json.loads((folder / "summary.json").read_text())["config"]["task"]["name"] == "denoise"


def test_wandb_offline_run_is_written(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import RUN

    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, str(RUN), f"hydra.run.dir={tmp_path / 'run'}", "solver=pinv", "data.limit=1",
           "logger=wandb", "logger.mode=offline", "progress=false", "task=denoise"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_partial_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = MetricsFile(path)
    good.append({"index": 0, "status": "ok", "psnr": 20.0, "ssim": 0.5, "lpips": 0.3})
    with open(path, "a") as handle:
        handle.write('{"index": 1, "status": "ok", "psn')
    records = good.read()
    assert [r["index"] for r in records] == [0]
    assert path.read_text().endswith("}\n")
    summary = summarize(records)
    assert summary["num_images"] == 1 and summary["metrics"]["psnr"]["mean"] == 20.0


def test_image_size_too_small_for_lpips_is_a_clear_error(tmp_path):
    from conftest import compose_config

    from g2d2.experiment.runner import ConfigError, run

    cfg = compose_config(["solver=pinv", "task=denoise", "data.image_size=16", "lpips_net=alex", "logger=none"])
    with pytest.raises(ConfigError, match="lpips_net=alex cannot score 16 px images.*lpips_net=vgg"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_mixed_precision_run_and_bad_precision(tmp_path):
    """precision=amp_bf16 runs G2D2 on the embedded prior end to end (weights stay fp32, finite metrics);
    an unknown precision is refused before anything is loaded, naming the accepted values."""
    from conftest import compose_config

    from g2d2.experiment.runner import ConfigError, run

    overrides = [
        "solver=g2d2", "task=denoise", "data.limit=1", "batch_size=1", "solver.num_steps=2", "solver.inner_iters=1",
        "logger=none", "device=cpu", "save_images=false", "progress=false",
    ]
    summary = run(compose_config([*overrides, "precision=amp_bf16"]), tmp_path / "amp")
    assert summary["num_images"] == 1 and summary["num_failed"] == 0
    assert summary["config"]["precision"] == "amp_bf16"
    assert all(math.isfinite(summary["metrics"][k]["mean"]) for k in ("psnr", "ssim", "lpips"))
    with pytest.raises(ConfigError, match="precision must be one of .*amp_bf16.*got 'fp8'"):
        run(compose_config([*overrides, "precision=fp8"]), tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_each_image_gets_its_own_operator_draw_at_any_batch_size(tmp_path):
    """The problem posed for image i (mask, measurement noise) depends on (seed, i) only: batch_size=2 saves
    one box per image, the two differ, and the pseudo-inverse scores equal those of batch_size=1."""
    from conftest import compose_config
    from safetensors.torch import load_file

    from g2d2.experiment.runner import run

    args = ["solver=pinv", "task=inpaint_box", "data.limit=3", "logger=none", "save_images=false", "progress=false"]
    runs = {b: run(compose_config([*args, f"batch_size={b}"]), tmp_path / f"b{b}") for b in (1, 2)}
    masks = {b: [load_file(str(tmp_path / f"b{b}" / "operators" / f"{i:05d}.safetensors"))["mask"] for i in range(3)]
             for b in runs}
    for i in range(3):
        assert torch.equal(masks[1][i], masks[2][i])
    assert not torch.equal(masks[2][0], masks[2][1])
    scores = {b: [(r["psnr"], r["ssim"]) for r in read_jsonl(tmp_path / f"b{b}" / "metrics.jsonl")] for b in runs}
    assert len(scores[1]) == len(scores[2]) == 3
    for one, two in zip(scores[1], scores[2], strict=True):  # pytest.approx refuses nested data (pytest >= 9)
        assert one == pytest.approx(two, rel=1e-5)
    assert [r["batch_size"] for r in read_jsonl(tmp_path / "b2" / "metrics.jsonl")] == [2, 2, 1]


def test_a_corrupt_line_before_the_last_is_refused_not_truncated(tmp_path):
    """Only the last line can be an interrupted write; a bad line in the middle must not silently
    delete the finished records after it."""
    path = tmp_path / "metrics.jsonl"
    records = MetricsFile(path)
    for i in range(3):
        records.append({"index": i, "status": "ok", "psnr": 20.0 + i})
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "\n" + "".join(lines[1:]))  # an empty line after the first record
    before = path.read_bytes()
    with pytest.raises(ValueError, match="line 2 of 4 is not a JSON record"):
        records.read()
    assert path.read_bytes() == before  # nothing truncated


def test_resume_refuses_a_data_set_whose_images_moved(tmp_path):
    from conftest import compose_config

    from g2d2.experiment.runner import ConfigError, run

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a0.png", "a1.png"):
        Image.new("RGB", (64, 64), (len(name) * 20, 90, 30)).save(folder / name)
    args = ["solver=pinv", "task=denoise", "data=folder", f"data.path={folder}", "data.image_size=64",
            "logger=none", "save_images=false", "progress=false"]
    run(compose_config(args), tmp_path / "out")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "a05.png")  # sorts between a0 and a1
    with pytest.raises(ConfigError, match="index 1 was 'a1.png', now 'a05.png'"):
        run(compose_config([*args, "resume=true"]), tmp_path / "out")
    # a changed config names the leaf that changed
    with pytest.raises(ConfigError, match=r"task.sigma: 0.05 -> 0.1"):
        run(compose_config([*args, "resume=true", "task.sigma=0.1"]), tmp_path / "out")


def test_one_run_per_output_folder_and_the_tracker_is_always_finished(tmp_path):
    from conftest import compose_config

    from g2d2.experiment.runner import ConfigError, exclusive_folder, run

    args = ["solver=pinv", "task=denoise", "data.limit=1", "logger=none", "save_images=false", "progress=false"]
    (tmp_path / "out").mkdir()
    with exclusive_folder(tmp_path / "out"):  # another run holds the folder
        with pytest.raises(ConfigError, match="another run is writing into"):
            run(compose_config(args), tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()

    class Tracker(NullLogger):  # records the calls; fails the run at its first image
        finished = False

        def start(self, *args, **kwargs):
            pass

        def log_image(self, *args):
            raise KeyboardInterrupt  # stands for Ctrl-C / SIGTERM between two images

        def finish(self):
            Tracker.finished = True

    with pytest.raises(KeyboardInterrupt):
        run(compose_config(args), tmp_path / "out", tracker=Tracker())
    assert Tracker.finished and len(read_jsonl(tmp_path / "out" / "metrics.jsonl")) == 1


def test_sigterm_exits_like_an_interrupt():
    from g2d2.experiment import cli as run_script

    with pytest.raises(SystemExit) as err:
        run_script.exit_on_sigterm(15, None)
    assert err.value.code == 143
