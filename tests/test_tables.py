"""The paper tables: experiment configs, method/setting groups, data sets, launchers, make_table.py."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, ROOT, compose_config, run_entry_point
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from PIL import Image

from g2d2.data import DataError, ImageFolder, ImageNetSubset, read_file_list
from g2d2.experiment.tables import (
    TableError,
    build_tables,
    load_published,
    load_summaries,
    load_unfinished,
    long_rows,
    protocol_differences,
    to_latex,
    to_markdown,
)
from g2d2.priors.base import DiscretePrior, PixelPrior

MAKE_TABLE = ROOT / "scripts" / "make_table.py"
WEIGHTS = ROOT / "g2d2" / "priors" / "weights"
TINY_PRIORS_READY = (WEIGHTS / "tiny_vq").is_dir() and (WEIGHTS / "tiny_ddpm").is_dir()

#: experiment -> (data choice, lpips_net, tasks, methods) that each table must sweep
EXPERIMENTS = {
    "table_dps_ffhq": ("ffhq", "vgg", {"sr4", "inpaint_box", "inpaint_random92", "gauss_deblur", "motion_deblur"},
                       {"dps_ffhq", "red_diff_ffhq", "g2d2_ffhq", "pinv"}),
    "table_dps_imagenet": ("imagenet", "vgg",
                           {"sr4", "inpaint_box", "inpaint_random92", "gauss_deblur", "motion_deblur"},
                           {"dps_imagenet", "red_diff_imagenet", "g2d2_imagenet", "pinv"}),
    "table_g2d2_ffhq": ("ffhq", "vgg", {"gauss_deblur", "sr4"}, {"g2d2_ffhq", "dps_ffhq", "red_diff_ffhq", "pinv"}),
    "table_g2d2_imagenet": ("imagenet", "vgg", {"gauss_deblur", "sr4"},
                            {"g2d2_imagenet", "dps_imagenet", "red_diff_imagenet", "pinv"}),
    "table_red_diff": ("imagenet", "alex", {"sr4", "gauss_deblur", "inpaint_box"},
                       {"red_diff_imagenet", "dps_imagenet", "g2d2_imagenet", "pinv"}),
    "table_discrete_priors_ffhq": ("ffhq", "vgg", {"gauss_deblur", "sr4"},
                                   {"g2d2_ffhq", "g2d2_amused_ffhq", "dps_ffhq", "red_diff_ffhq", "pinv"}),
    "table_discrete_priors_imagenet": ("imagenet", "vgg", {"gauss_deblur", "sr4"},
                                       {"g2d2_imagenet", "g2d2_amused_imagenet", "dps_imagenet", "red_diff_imagenet",
                                        "pinv"}),
    "tiny_table": ("embedded", "vgg", {"sr4", "gauss_deblur", "inpaint_box"},
                   {"pinv", "g2d2_tiny", "red_diff_tiny", "dps_tiny"}),
}
#: method -> (solver, prior, noise_schedule) it must select
METHODS = {
    "pinv": ("pinv", None, None),
    "g2d2_tiny": ("g2d2", "tiny_vq", "star"),
    "dps_tiny": ("dps", "tiny_ddpm", "ddpm"),
    "red_diff_tiny": ("red_diff", "tiny_ddpm", "ddpm_leading"),
    "dps_ffhq": ("dps", "adm_ffhq", "ddpm"),
    "red_diff_ffhq": ("red_diff", "adm_ffhq", "ddpm_leading"),
    "g2d2_ffhq": ("g2d2", "vq_diffusion_ithq", "markov"),
    "dps_imagenet": ("dps", "adm_imagenet", "ddpm"),
    "red_diff_imagenet": ("red_diff", "adm_imagenet", "ddpm_leading"),
    "g2d2_imagenet": ("g2d2", "vq_diffusion_ithq", "markov"),
    "g2d2_amused_ffhq": ("g2d2", "amused_256", "star"),
    "g2d2_amused_imagenet": ("g2d2", "amused_256", "star"),
}
FAST = ["logger=none", "progress=false", "save_images=false"]


def sweep_cells(experiment: str) -> list[dict[str, str]]:
    """The experiment's hydra.sweeper.params expanded into one override dict per job."""
    cfg = compose_config([f"+experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


@functools.cache
def check_operator(operator_yaml: str, image_size: int) -> None:
    """The task's operator builds and maps a (1, 3, S, S) image (cached: some take seconds to build)."""
    operator = instantiate(OmegaConf.create(operator_yaml), generator=torch.Generator().manual_seed(0))
    assert operator.forward(torch.zeros(1, 3, image_size, image_size)).shape[0] == 1


#: DPS on the ImageNet ADM: the deblur scales derived in conf/setting/dps_adm_imagenet.yaml
DPS_IMAGENET_SCALES = {"gauss_deblur": 0.12, "motion_deblur": 0.18}


def expected_setting(solver: str, task: str, prior: str | None = None) -> dict[str, float]:
    """The papers' per-(solver, task) settings of conf/setting/ (and DPS's ImageNet deblur scales) must apply."""
    if solver == "dps":
        scale = 0.5 if task.startswith("inpaint") else 0.3
        return {"scale": DPS_IMAGENET_SCALES.get(task, scale) if prior == "adm_imagenet" else scale}
    if solver == "g2d2" and task == "gauss_deblur":
        return {"lr0": 15.0, "lr_decay_w": 1.0}
    if solver == "g2d2" and task == "sr4":
        return {"lr0": 10.0, "lr_decay_w": 2.0}
    return {}


#: CPU budgets of the embedded tiny priors (conf/setting/<solver>_<prior>.yaml), applied after the per-task settings
TINY_BUDGETS = {
    ("g2d2", "tiny_vq"): {"num_steps": 10, "inner_iters": 20},
    ("dps", "tiny_ddpm"): {"num_steps": 100, "scale": 10.0},
    ("red_diff", "tiny_ddpm"): {"num_steps": 100, "lr": 0.1},
}


def expected_solver_values(solver: str, prior: str | None, task: str) -> dict[str, float]:
    """Per-task settings, overridden by the tiny-prior budget where there is one."""
    return {**expected_setting(solver, task, prior), **TINY_BUDGETS.get((solver, prior), {})}


# ---------------------------------------------------------------------------------------------- configs


def test_method_group_has_exactly_the_known_methods():
    assert {p.stem for p in (CONF / "method").glob("*.yaml")} == set(METHODS)


def test_root_config_picks_per_task_settings():
    """conf/config.yaml must hold `- optional setting: ${solver}_${task}` after _self_, then the per-(solver, prior)
    line (see conf/setting/)."""
    cfg = compose_config(["solver=dps", "task=inpaint_box", "prior=adm_ffhq"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.get("setting") == "dps_inpaint_box", (
        "conf/config.yaml lacks the defaults entry `- optional setting: ${solver}_${task}` (after _self_)"
    )
    assert cfg.solver.scale == 0.5
    assert compose_config(["solver=dps", "task=sr4", "prior=adm_ffhq"]).solver.scale == 0.3
    # a command-line value still wins over the setting
    assert compose_config(["solver=dps", "task=inpaint_box", "prior=adm_ffhq", "solver.scale=1.5"]).solver.scale == 1.5
    # the tiny prior's CPU budget (conf/setting/dps_tiny_ddpm.yaml) comes after the per-task setting
    tiny = compose_config(["solver=dps", "task=inpaint_box", "prior=tiny_ddpm"], return_hydra_config=True)
    assert tiny.hydra.runtime.choices.get("setting@_global_") == "dps_tiny_ddpm"
    assert (tiny.solver.scale, tiny.solver.num_steps, tiny.batch_size) == (10.0, 100, 4)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_job_of_every_table_composes_with_the_paper_settings(experiment):
    data, lpips_net, tasks, methods = EXPERIMENTS[experiment]
    cells = sweep_cells(experiment)
    assert {c["task"] for c in cells} == tasks and {c["method"] for c in cells} == methods
    assert len(cells) == len(tasks) * len(methods)
    for cell in cells:
        overrides = [f"+experiment={experiment}", *(f"{k}={v}" for k, v in cell.items())]
        cfg = compose_config(overrides, return_hydra_config=True)
        choices = cfg.hydra.runtime.choices
        solver, prior, schedule = METHODS[cell["method"]]
        where = f"{experiment} {cell}"
        assert (choices.solver, choices.get("prior"), choices.data) == (solver, prior, data), where
        assert choices.get("noise_schedule") == schedule, where
        assert cfg.experiment_name == experiment and cfg.lpips_net == lpips_net and cfg.seed == 0, where
        assert cfg.task.sigma == 0.05 and cfg.task.name == cell["task"], where
        for key, value in expected_solver_values(solver, prior, cell["task"]).items():
            assert cfg.solver[key] == value, (where, key, "per-task setting not applied: is the root line there?")
        if cell["method"] == "g2d2_ffhq":
            assert cfg.prior.prompt == "a high-quality headshot of a person" and cfg.precision == "fp16"
        if cell["task"] == "inpaint_random92":
            assert cfg.task.operator.missing_fraction == 0.92
        # what `--cfg job` prints: the job config without the hydra node, valid yaml
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        assert yaml.safe_load(OmegaConf.to_yaml(job))["experiment_name"] == experiment
        # the cheap parts instantiate; the solver accepts the prior kind the method pairs it with
        schedule_obj = instantiate(cfg.noise_schedule) if cfg.get("noise_schedule") else None
        solver_obj = instantiate(cfg.solver, noise_schedule=schedule_obj)
        if prior is None:
            assert solver_obj.prior_kind is None and "prior" not in cfg and "noise_schedule" not in cfg, where
        else:
            kind = {"discrete": DiscretePrior, "pixel": PixelPrior}[solver_obj.prior_kind]
            assert issubclass(get_class(cfg.prior._target_), kind), where
        image_size = 64 if data == "embedded" else 256
        assert cfg.data.image_size == image_size, where
        check_operator(OmegaConf.to_yaml(cfg.task.operator, resolve=True), image_size)
        # the sweep names each job by task and method
        subdir = OmegaConf.to_container(cfg.hydra.sweep)["subdir"]  # unresolved: job.num is set at launch
        assert subdir == "${hydra.job.num}_${hydra.runtime.choices.task}_${hydra.runtime.choices.method}"


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_run_py_prints_the_job_config_of_a_table_cell(experiment, tmp_path):
    cell = sweep_cells(experiment)[-1]
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("G2D2_FFHQ_DIR", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "run.py"), f"+experiment={experiment}",
           *(f"{k}={v}" for k, v in cell.items()), "--cfg", "job"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["experiment_name"] == experiment and job["task"]["name"] == cell["task"]
    if experiment != "tiny_table":
        # the data path comes from the environment and is required
        assert "G2D2_" in job["data"]["path"] and "???" in job["data"]["path"]


# ------------------------------------------------------------------------------------------------ data


def _write_images(folder: Path, names: list[str], size: tuple[int, int] = (40, 30)) -> None:
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10 * i, 100, 200)).save(path)


def test_ffhq_layout_release_root_and_folder_00000_select_the_same_first_images(tmp_path):
    names = [f"00000/{i:05d}.png" for i in range(3)] + [f"01000/{i:05d}.png" for i in range(1000, 1002)]
    _write_images(tmp_path, names)
    root = ImageFolder(str(tmp_path), image_size=16, recursive=True, limit=3)
    sub = ImageFolder(str(tmp_path / "00000"), image_size=16, limit=3)
    assert root.names == names[:3]
    assert [Path(n).name for n in sub.names] == [Path(n).name for n in root.names]
    name, x = root[0]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, sub[0][1])


def test_ffhq_config_reads_the_folder_from_the_environment(tmp_path, monkeypatch):
    _write_images(tmp_path, [f"{i:05d}.png" for i in range(2)], size=(300, 300))
    monkeypatch.setenv("G2D2_FFHQ_DIR", str(tmp_path))
    data = instantiate(compose_config(["data=ffhq"]).data)
    assert isinstance(data, ImageFolder) and len(data) == 2
    assert data[1][1].shape == (3, 256, 256)


def test_imagenet_file_list_with_labels_gives_prompts(tmp_path):
    # a validation folder with one sub-folder per class; the list names bare files and one relative path
    _write_images(tmp_path / "val", ["n01440764/ILSVRC2012_val_00000293.JPEG", "n01443537/ILSVRC2012_val_00000236.JPEG",
                                     "n01484850/ILSVRC2012_val_00002338.JPEG"])
    listing = tmp_path / "list.txt"
    listing.write_text("# name label\nILSVRC2012_val_00000236.JPEG 1\nn01440764/ILSVRC2012_val_00000293.JPEG 0\n")
    data = ImageNetSubset(str(tmp_path / "val"), image_size=8, file_list=str(listing))
    assert data.names == ["n01443537/ILSVRC2012_val_00000236.JPEG", "n01440764/ILSVRC2012_val_00000293.JPEG"]
    assert data.prompt(0) == "a photo of goldfish" and data.prompt(1) == "a photo of tench"
    assert data[1][1].shape == (3, 8, 8)
    # a folder of images without a list: sorted, no labels
    plain = ImageNetSubset(str(tmp_path / "val"), image_size=8)
    assert len(plain) == 3 and plain.prompt(0) is None
    # own class names file
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(1000)))
    custom = ImageNetSubset(str(tmp_path / "val"), image_size=8, file_list=str(listing), class_names=str(names),
                            prompt_template="an image of {}")
    assert custom.prompt(0) == "an image of class 1"


def test_imagenet_without_a_list_warns_when_it_takes_a_sorted_subset(tmp_path, caplog):
    """A full validation folder without the 1k list: data.limit (1000 in the config) keeps the cell at 1k
    images, and the run says that these are not the papers' list."""
    _write_images(tmp_path / "val", [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 4)])
    with caplog.at_level("WARNING", logger="g2d2.data"):
        data = ImageNetSubset(str(tmp_path / "val"), image_size=8, limit=2)
    assert len(data) == 2 and data.num_available == 3
    assert "using 2 of the 3 images" in caplog.text and "G2D2_IMAGENET_LIST" in caplog.text
    caplog.clear()
    listing = tmp_path / "list.txt"
    listing.write_text("ILSVRC2012_val_00000002.JPEG 5\nILSVRC2012_val_00000003.JPEG 6\n")
    with caplog.at_level("WARNING", logger="g2d2.data"):
        listed = ImageNetSubset(str(tmp_path / "val"), image_size=8, file_list=str(listing), limit=1)
    assert len(listed) == 1 and listed.num_available == 2 and not caplog.text
    assert compose_config(["data=imagenet", "data.path=/x"]).data.limit == 1000


def test_imagenet_config_composes_with_env_list(tmp_path, monkeypatch):
    _write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "list.txt").write_text("b.png 7\n")
    monkeypatch.setenv("G2D2_IMAGENET_DIR", str(tmp_path))
    monkeypatch.setenv("G2D2_IMAGENET_LIST", str(tmp_path / "list.txt"))
    data = instantiate(compose_config(["data=imagenet"]).data)
    assert data.names == ["b.png"] and data.labels == [7]
    monkeypatch.delenv("G2D2_IMAGENET_LIST")
    assert len(instantiate(compose_config(["data=imagenet"]).data)) == 2


def test_bad_file_lists_are_clear_errors(tmp_path):
    _write_images(tmp_path, ["a.png", "sub/b.png", "sub2/b.png"])
    listing = tmp_path / "list.txt"
    for text, message in (("a.png x\n", "expected"), ("a.png\na.png\n", "twice"), ("# a comment\n", "no images")):
        listing.write_text(text)
        with pytest.raises(DataError, match=message):
            read_file_list(listing)
    for text, message in (("missing.png\n", "not below"), ("b.png\n", "several files")):
        listing.write_text(text)
        with pytest.raises(DataError, match=message):
            ImageFolder(str(tmp_path), image_size=8, file_list=str(listing))
    listing.write_text("sub2/b.png\n")  # a relative path is never ambiguous
    assert ImageFolder(str(tmp_path), image_size=8, file_list=str(listing)).names == ["sub2/b.png"]
    listing.write_text("a.png 1000\n")
    with pytest.raises(DataError, match="0..999"):
        ImageNetSubset(str(tmp_path), image_size=8, file_list=str(listing))


# -------------------------------------------------------------------------------------------- launchers


def test_slurm_launcher_composes_instantiates_and_writes_the_sbatch_options(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = compose_config(["+experiment=tiny_table", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                          "hydra.launcher.timeout_min=90", "hydra.launcher.gpus_per_node=2",
                          f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    assert launcher.params["submitit_folder"] == f"{tmp_path}/.submitit/%j"
    assert launcher.params["name"] == "tiny_table"
    # what SlurmLauncher.launch does with its params, up to the sbatch file (a fake srun passes its check)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=launcher.params["submitit_folder"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{
        k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
        if k not in ("submitit_folder", "max_num_timeout")
    })
    text = executor._executor._make_submission_file_text("python scripts/run.py", "uid")
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--job-name=tiny_table"):
        assert f"#SBATCH {line}" in text


def test_local_joblib_launcher_composes_and_instantiates():
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    cfg = compose_config(["hydra/launcher=local", "hydra.launcher.n_jobs=3"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, JoblibLauncher)
    assert launcher.joblib["n_jobs"] == 3


@pytest.mark.slow
def test_joblib_launcher_runs_a_table_sweep_in_parallel(tmp_path):
    run_entry_point(["-m", "+experiment=tiny_table", "method=pinv", "task=sr4,inpaint_box", "data.limit=1",
                     "hydra/launcher=local", "hydra.launcher.n_jobs=2", *FAST], tmp_path)
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0_sr4_pinv", "1_inpaint_box_pinv"]


# ------------------------------------------------------------------------------------------ make_table


def fake_summary(task: str, solver: str, prior: str | None, psnr: list[float], data: str = "ffhq",
                 lpips_net: str = "vgg", experiment: str = "table_dps_ffhq") -> dict:
    n = len(psnr)
    mean = sum(psnr) / n
    std = math.sqrt(sum((p - mean) ** 2 for p in psnr) / (n - 1)) if n > 1 else 0.0
    return {
        "num_images": n, "num_failed": 0, "failed": [],
        "metrics": {"psnr": {"mean": mean, "std": std, "count": n}, "ssim": {"mean": 0.8, "std": 0.01, "count": n},
                    "lpips": {"mean": 0.2, "std": 0.02, "count": n},
                    "seconds": {"mean": 1.0, "std": 0.0, "count": n}},
        "choices": {"task": task, "solver": solver, "prior": prior, "data": data},
        "config": {"experiment_name": experiment, "lpips_net": lpips_net, "seed": 0, "data": {"name": data},
                   "solver": {"_target_": f"g2d2.solvers.{'pinv.PseudoInverse' if solver == 'pinv' else 'dps.DPS'}"}},
    }


def write_sweep(root: Path, summaries: list[dict]) -> Path:
    for i, s in enumerate(summaries):
        folder = root / f"{i}_{s['choices']['task']}_{s['choices']['solver']}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(s))
    return root


def test_published_numbers_have_sources_and_statuses():
    published = load_published()
    keys = {(e["method"], e["dataset"], e["task"], e["source"]) for e in published["entries"]}
    assert len(keys) == len(published["entries"])  # no duplicate entry
    dps = {e["task"]: e for e in published["entries"] if e["method"] == "DPS" and e["dataset"] == "ffhq"}
    assert dps["sr4"]["lpips"] == 0.214 and dps["sr4"]["psnr"] == 25.67 and dps["sr4"]["status"] == "verified"
    assert set(dps) == EXPERIMENTS["table_dps_ffhq"][2]


def test_tables_put_ours_beside_the_published_numbers(tmp_path):
    sweep = write_sweep(tmp_path, [
        fake_summary("sr4", "dps", "adm_ffhq", [25.0, 27.0]),
        fake_summary("inpaint_box", "dps", "adm_ffhq", [22.0, 23.0, 24.0]),
        fake_summary("sr4", "pinv", None, [20.0, 21.0]),
        fake_summary("sr4", "pinv", None, [20.0]),  # a duplicate with fewer images: ignored
    ])
    [table] = build_tables(load_summaries(sweep), load_published())
    assert table.experiment == "table_dps_ffhq" and table.tasks == ["sr4", "inpaint_box"]
    ours = [r.label for r in table.rows if not r.published]
    assert ours == ["dps (adm_ffhq)", "pinv"]
    md = to_markdown(table, ["psnr", "lpips"])
    assert "| dps (adm_ffhq) | 26.00 ± 1.41 | 23.00 ± 1.00 |" in md
    assert "| pinv | 20.50 ± 0.71 | – |" in md
    assert "DPS — published: Chung et al." in md and "[verified]" in md and "25.67 | 22.47" in md
    assert "| dps (adm_ffhq) | 2 | 3 |" in md  # images per cell
    assert "SSIM" not in md and "†" not in md
    tex = to_latex(table, ["psnr"])
    assert r"inpaint\_box" in tex and r"26.00 $\pm$ 1.41" in tex and r"\toprule" in tex
    assert any(row[1] == "pinv" and row[5] == "psnr" for row in long_rows(table))


def test_lpips_of_another_backbone_is_marked(tmp_path):
    sweep = write_sweep(tmp_path, [fake_summary("sr4", "dps", "adm_imagenet", [24.0], data="imagenet",
                                                lpips_net="alex", experiment="table_red_diff")])
    [table] = build_tables(load_summaries(sweep), load_published())
    md = to_markdown(table, ["lpips"])
    assert "0.337†" in md and "not comparable" in md
    assert "RED-Diff — published" not in md  # RED-Diff's ImageNet entry has PSNR only
    assert "RED-Diff — published" in to_markdown(table, ["psnr"])


def test_make_table_cli_writes_markdown_latex_and_a_wandb_table(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", [fake_summary("gauss_deblur", "dps", "adm_ffhq", [24.0, 25.0],
                                                          experiment="table_g2d2_ffhq")])
    out = tmp_path / "tables" / "t.md"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, str(MAKE_TABLE), str(sweep), "--metrics", "psnr,lpips", "--out", str(out),
                           "--wandb", "offline"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "## table_g2d2_ffhq" in proc.stdout and r"\begin{tabular}" in proc.stdout
    assert "24.50 ± 0.71" in out.read_text() and "0.292" in out.read_text()  # the G2D2 preset's LPIPS
    assert r"24.50 $\pm$ 0.71" in out.with_suffix(".tex").read_text()
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    bad = subprocess.run([sys.executable, str(MAKE_TABLE), str(sweep), "--metrics", "psnr,fidelity"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "fidelity" in bad.stderr


# ------------------------------------------------------------------------------- end to end, tiny priors


def check_table_run(tmp_path: Path, tasks: list[str], methods: list[str]) -> str:
    summaries = load_summaries(tmp_path / "sweep")
    assert len(summaries) == len(tasks) * len(methods)
    for s in summaries:
        assert s["num_images"] == 2 and s["num_failed"] == 0, s["_path"]
        assert all(math.isfinite(s["metrics"][m]["mean"]) for m in ("psnr", "ssim", "lpips"))
        assert s["config"]["experiment_name"] == "tiny_table" and s["config"]["lpips_net"] == "vgg"
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(MAKE_TABLE), str(tmp_path / "sweep"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = out.read_text()
    assert f"| method | {' | '.join(tasks)} |" in md
    return md


@pytest.mark.slow
def test_tiny_table_pinv_rows_end_to_end(tmp_path):
    """Always runs: the sweep + make_table path with the prior-free method."""
    run_entry_point(["-m", "+experiment=tiny_table", "method=pinv", "task=sr4,gauss_deblur", "data.limit=2", *FAST],
                    tmp_path)
    md = check_table_run(tmp_path, ["sr4", "gauss_deblur"], ["pinv"])
    assert "| pinv | 2 | 2 |" in md


@pytest.mark.slow
def test_tiny_table_with_the_tiny_priors_end_to_end(tmp_path):
    """2 tasks x 3 solvers on the embedded tiny priors, few steps, 2 images, then make_table; two jobs at a time
    (the local joblib launcher README recommends for this table), one OpenMP thread each.

    Skipped (visibly) until g2d2/priors/weights/tiny_vq and tiny_ddpm exist; with
    G2D2_REQUIRE_TINY_PRIORS=1 (CI, once the weights are committed) a missing prior fails instead.
    """
    if not TINY_PRIORS_READY:
        if os.environ.get("G2D2_REQUIRE_TINY_PRIORS") == "1":
            pytest.fail(f"tiny prior weights missing under {WEIGHTS} (tiny_vq/, tiny_ddpm/)")
        pytest.skip(f"tiny prior weights not yet under {WEIGHTS}: train them with scripts/train_tiny_priors.py")
    methods = ["g2d2_tiny", "red_diff_tiny", "dps_tiny"]
    run_entry_point(["-m", "+experiment=tiny_table", f"method={','.join(methods)}", "task=sr4,gauss_deblur",
                     "data.limit=2", "solver.num_steps=4", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *FAST],
                    tmp_path)
    md = check_table_run(tmp_path, ["sr4", "gauss_deblur"], methods)
    for label in ("g2d2 (tiny_vq)", "red_diff (tiny_ddpm)", "dps (tiny_ddpm)"):
        assert f"| {label} | 2 | 2 |" in md


# ------------------------------------------------------------------- review fixes: honest cells and notes


def test_unfinished_run_shows_as_an_unfinished_cell_and_is_warned(tmp_path, caplog):
    sweep = write_sweep(tmp_path, [fake_summary("sr4", "dps", "adm_ffhq", [25.0, 27.0])])
    killed = tmp_path / "1_inpaint_box_dps"
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"task": "inpaint_box", "solver": "dps", "prior": "adm_ffhq"}}}}))
    (killed / "run_config.json").write_text(json.dumps(fake_summary("inpaint_box", "dps", "adm_ffhq", [1.0])["config"]))
    (killed / "metrics.jsonl").write_text('{"index": 0, "status": "ok", "psnr": 20.0}\n'
                                          '{"index": 1, "status": "failed"}\n')
    with caplog.at_level("WARNING"):
        unfinished = load_unfinished(sweep)
    assert len(unfinished) == 1 and unfinished[0]["done"] == 1 and unfinished[0]["failed"] == 1
    assert "no summary.json" in caplog.text and "1_inpaint_box_dps" in caplog.text
    [table] = build_tables(load_summaries(sweep), unfinished=unfinished)
    assert table.tasks == ["sr4", "inpaint_box"]
    md = to_markdown(table, ["psnr"])
    assert "| dps (adm_ffhq) | 26.00 ± 1.41 | unfinished |" in md
    assert "| dps (adm_ffhq) | 2 | unfinished (1 done, 1 failed) |" in md
    assert "Unfinished: dps (adm_ffhq) / inpaint_box" in md
    assert "unfinished" in to_latex(table, ["psnr"])


def test_make_table_cli_reports_unfinished_runs(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", [fake_summary("sr4", "pinv", None, [20.0])])
    (sweep / "1_gauss_deblur_pinv").mkdir()
    (sweep / "1_gauss_deblur_pinv" / "metrics.jsonl").write_text('{"index": 0, "status": "ok"}\n')
    proc = subprocess.run([sys.executable, str(MAKE_TABLE), str(sweep), "--no-published"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1_gauss_deblur_pinv" in proc.stderr and "no summary.json" in proc.stderr
    assert "Unfinished run (cell unknown)" in proc.stdout  # no .hydra/ to name the cell: still reported


def test_partial_cells_are_flagged_in_markdown_and_latex(tmp_path):
    partial = fake_summary("gauss_deblur", "dps", "adm_ffhq", [24.0, 25.0, 26.0])
    partial["num_expected"] = 1000
    complete = fake_summary("sr4", "dps", "adm_ffhq", [25.0, 27.0])
    complete["num_expected"] = 2
    old = fake_summary("inpaint_box", "dps", "adm_ffhq", [22.0])  # no num_expected: unknown, not flagged
    [table] = build_tables(load_summaries(write_sweep(tmp_path, [partial, complete, old])))
    md = to_markdown(table, ["psnr"])
    assert "| dps (adm_ffhq) | 26.00 ± 1.41 | 22.00 | 25.00 ± 1.00‡ |" in md  # one image: no std
    assert "| dps (adm_ffhq) | 2 | 1 | 3/1000 |" in md
    assert "‡ partial" in md
    tex = to_latex(table, ["psnr"])
    assert r"25.00 $\pm$ 1.00$^\ddagger$" in tex and "3/1000" in tex and r"$^\ddagger$ partial" in tex


def test_failed_images_are_not_partial(tmp_path):
    s = fake_summary("sr4", "dps", "adm_ffhq", [25.0, 27.0])
    s.update(num_failed=1, num_expected=3)
    [table] = build_tables(load_summaries(write_sweep(tmp_path, [s])))
    md = to_markdown(table, ["psnr"])
    assert "| dps (adm_ffhq) | 2/3 (1 failed) |" in md and "‡" not in md


def test_per_metric_exclusions_are_shown(tmp_path):
    s = fake_summary("sr4", "pinv", None, [20.0, 21.0, 22.0, 23.0])
    s["metrics"]["psnr"].update(count=1, excluded=3)
    old = fake_summary("gauss_deblur", "pinv", None, [20.0, 21.0])
    old["metrics"]["ssim"]["count"] = 1  # an old summary without "excluded": the count difference
    [table] = build_tables(load_summaries(write_sweep(tmp_path, [s, old])))
    md = to_markdown(table, ["psnr"])
    assert "| pinv | 4 (psnr: 3 excluded) | 2 (ssim: 1 excluded) |" in md


def test_duplicate_runs_with_another_protocol_are_refused(tmp_path):
    a = fake_summary("sr4", "pinv", None, [20.0, 21.0])
    b = fake_summary("sr4", "pinv", None, [30.0, 31.0])
    a["config"]["task"] = {"name": "sr4", "sigma": 0.05}
    b["config"]["task"] = {"name": "sr4", "sigma": 0.0}
    b["config"].update(resume=True, device="cuda", progress=False)  # free keys: not reported
    assert protocol_differences(a["config"], b["config"]) == ["task.sigma"]
    sweep = write_sweep(tmp_path / "sweep", [a, b])
    with pytest.raises(TableError, match=r"task\.sigma.*0_sr4_pinv.*1_sr4_pinv"):
        build_tables(load_summaries(sweep))
    proc = subprocess.run([sys.executable, str(MAKE_TABLE), str(sweep)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "task.sigma" in proc.stderr and "Traceback" not in proc.stderr


def test_duplicate_runs_of_one_protocol_keep_more_images_then_the_newest(tmp_path, caplog):
    fewer = fake_summary("sr4", "pinv", None, [20.0])
    more = fake_summary("sr4", "pinv", None, [21.0, 23.0])
    more["config"]["resume"] = True
    sweep = write_sweep(tmp_path / "a", [more, fewer])
    with caplog.at_level("WARNING"):
        [table] = build_tables(load_summaries(sweep))
    assert "| pinv | 22.00 ± 1.41 |" in to_markdown(table, ["psnr"])
    assert f"kept {sweep / '0_sr4_pinv'} (2 images, more images)" in caplog.text
    old, new = fake_summary("sr4", "pinv", None, [20.0]), fake_summary("sr4", "pinv", None, [30.0])
    sweep = write_sweep(tmp_path / "b", [new, old])  # 0_ holds the newer numbers: path order must not win
    os.utime(sweep / "1_sr4_pinv" / "summary.json", (1_000_000, 1_000_000))
    caplog.clear()
    with caplog.at_level("WARNING"):
        [table] = build_tables(load_summaries(sweep))
    assert "| pinv | 30.00 |" in to_markdown(table, ["psnr"])
    assert f"kept {sweep / '0_sr4_pinv'} (1 images, newer)" in caplog.text


def test_published_notes_and_dagger_legend_are_printed(tmp_path):
    sweep = write_sweep(tmp_path, [fake_summary("sr4", "red_diff", "adm_imagenet", [24.0], data="imagenet",
                                                lpips_net="alex", experiment="table_red_diff")])
    [table] = build_tables(load_summaries(sweep), load_published())
    md = to_markdown(table, ["psnr", "lpips"])
    assert "1k validation images, 256 px, sigma 0.05" in md  # the dps source note
    assert "the same listing also gives 22.73" in md  # an entry note
    assert "† LPIPS with another" in md
    tex = to_latex(table, ["lpips"])
    rows = [line for line in tex.splitlines() if line.startswith(r"\multicolumn")]
    assert any("1k validation images" in line for line in rows)
    assert any(r"$^\dagger$ LPIPS with another" in line for line in rows)
    assert any("22.73" in line for line in rows)


def test_tiny_table_smoke_test_comment_names_overrides_that_every_job_accepts():
    text = (CONF / "experiment" / "tiny_table.yaml").read_text()
    commands = [line for line in text.splitlines() if "scripts/run.py -m" in line]
    assert any("data.limit=1" in line for line in commands)
    assert not any("num_steps" in line for line in commands)
    for cell in sweep_cells("tiny_table"):
        compose_config(["+experiment=tiny_table", *(f"{k}={v}" for k, v in cell.items()), "data.limit=1",
                        "logger=none"])
