"""scripts/make_figure.py on fabricated run folders: clear errors, ground truth from any run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from PIL import Image

from g2d2.experiment import figures as make_figure

MAKE_FIGURE = ROOT / "scripts" / "make_figure.py"


def fake_run(folder: Path, task: str, method: str, images: dict[int, tuple[str, ...]]) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"choices": {"task": task, "method": method}}))
    for index, suffixes in images.items():
        for suffix in suffixes:
            Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "images" / f"{index:05d}_img_{suffix}.png")


def figure(sweep: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAKE_FIGURE), str(sweep), *args], capture_output=True, text=True,
                          timeout=120)


def test_missing_method_or_image_index_is_a_clear_error(tmp_path):
    fake_run(tmp_path / "0_sr4_pinv", "sr4", "pinv", {0: ("gt", "measurement", "recon")})
    proc = figure(tmp_path, "--methods", "pinv,dps", "--out", str(tmp_path / "f.png"))
    assert proc.returncode != 0 and "StopIteration" not in proc.stderr
    assert "['dps']" in proc.stderr and "available: ['pinv']" in proc.stderr
    proc = figure(tmp_path, "--images", "7", "--out", str(tmp_path / "f.png"))
    assert proc.returncode != 0 and "StopIteration" not in proc.stderr
    assert "[7]" in proc.stderr and "indices with a saved reconstruction: [0]" in proc.stderr


def test_ground_truth_comes_from_any_run_that_has_it(tmp_path):
    fake_run(tmp_path / "0_sr4_aaa", "sr4", "aaa", {})  # image 0 failed in the first method's run
    fake_run(tmp_path / "1_sr4_pinv", "sr4", "pinv", {0: ("gt", "measurement", "recon")})
    out = tmp_path / "f.png"
    proc = figure(tmp_path, "--images", "0", "--scale", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    canvas = Image.open(out).convert("RGB")
    left, top, pad, size = 110, 18, 2, 8
    for column in (0, 1, 3):  # ground truth, measurement, pinv; column 2 (aaa) stays blank
        assert canvas.getpixel((left + column * (size + pad) + 4, top + 4)) == (200, 10, 10), column
    assert canvas.getpixel((left + 2 * (size + pad) + 4, top + 4)) == (255, 255, 255)


def test_default_figure_goes_into_the_sweep_in_the_table_order_without_empty_rows(tmp_path):
    for i, (task, method) in enumerate([("gauss_deblur", "dps_tiny"), ("sr4", "pinv"), ("sr4", "dps_tiny"),
                                        ("gauss_deblur", "pinv"), ("sr4", "g2d2_tiny")]):
        fake_run(tmp_path / f"{i}_{task}_{method}", task, method, {0: ("gt", "measurement", "recon")})
        summary = tmp_path / f"{i}_{task}_{method}" / "summary.json"
        summary.write_text(json.dumps({"choices": {"task": task, "method": method, "solver": method.split("_")[0]}}))
    proc = figure(tmp_path, "--scale", "1")  # --images 0,1 by default; the runs hold image 0 only
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "reconstructions.png"  # in the sweep, not the current folder
    assert "wrote" in proc.stderr and str(out) in proc.stderr
    width, height = Image.open(out).size
    left, top, pad, size = 110, 18, 2, 8
    assert height == top + 2 * (size + pad)  # sr4 #0, gauss_deblur #0: no empty rows for #1
    assert width == left + 5 * (size + pad)  # gt, measurement, g2d2_tiny, dps_tiny, pinv
    runs, solvers = make_figure.collect(tmp_path)
    assert make_figure.table_order({t for t, _ in runs}, make_figure.TASK_ORDER) == ["sr4", "gauss_deblur"]
    assert make_figure.table_order({m for _, m in runs}, make_figure.SOLVER_ORDER, key=solvers.get) == [
        "g2d2_tiny", "dps_tiny", "pinv"]


def test_the_shards_of_a_cell_make_one_column(tmp_path):
    """Images of a sharded cell are named by their global index, so rows come from whichever shard has them."""
    fake_run(tmp_path / "sr4_pinv_shard0", "sr4", "pinv", {0: ("gt", "measurement", "recon")})
    fake_run(tmp_path / "sr4_pinv_shard1", "sr4", "pinv", {1: ("gt", "measurement", "recon")})
    out = tmp_path / "f.png"
    proc = figure(tmp_path, "--images", "0,1", "--scale", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    canvas = Image.open(out).convert("RGB")
    left, top, pad, size = 110, 18, 2, 8
    assert canvas.size == (left + 3 * (size + pad), top + 2 * (size + pad))
    for row in (0, 1):
        assert canvas.getpixel((left + 2 * (size + pad) + 4, top + row * (size + pad) + 4)) == (200, 10, 10), row
