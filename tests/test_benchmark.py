"""Smoke test of scripts/benchmark.py at tiny scale on the CPU (the GPU run uses --scale full)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, str(SCRIPT), "--scale", "tiny", "--device", "cpu", "--measure-steps", "1",
        "--out", str(out / "benchmark.json"), "--markdown", str(out / "benchmark.md"), "--workdir", str(out / "ckpt"),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    log = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"benchmark.py failed ({proc.returncode}):\n{log}"
    return json.loads((out / "benchmark.json").read_text()), (out / "benchmark.md").read_text(), seconds


def test_tiny_benchmark_rows(tiny_run: tuple[dict, str, float]) -> None:
    result, _, seconds = tiny_run
    assert seconds < 60, f"tiny benchmark took {seconds:.0f} s (budget 60 s)"
    rows = result["rows"]
    assert {r["solver"] for r in rows} == {"g2d2", "red_diff", "dps", "pinv"}
    for r in rows:
        assert r["status"] == "ok", r
        assert math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0, r
        assert math.isfinite(r["s_per_image"]) and r["s_per_image"] >= r["s_per_step"], r
        assert r["peak_gpu_mib"] is None  # CPU run: no GPU figure, peak RSS instead
        assert r["peak_rss_mib"] > 0
    for r in rows:
        if r["solver"] != "pinv":
            assert r["steps_timed"] == 1
            assert r["bare_s_per_step"] > 0 and math.isfinite(r["overhead"]), r
            assert r["precision"] in ("fp32", "fp16")
    # paper step counts are what is extrapolated to
    g2d2 = next(r for r in rows if r["solver"] == "g2d2")
    assert (g2d2["num_steps"], g2d2["inner_iters"]) == (100, 30)
    assert g2d2["bare_s_per_step"] == pytest.approx(g2d2["transformer_s"] + 30 * g2d2["decode_fwd_bwd_s"])
    assert {r["num_steps"] for r in rows if r["solver"] in ("dps", "red_diff")} == {1000}
    # every pixel solver ran on both ADM shapes at both precisions
    assert len([r for r in rows if r["solver"] == "dps"]) == 4


def test_tiny_benchmark_markdown(tiny_run: tuple[dict, str, float]) -> None:
    result, markdown, _ = tiny_run
    assert "| solver | prior shape | precision | peak GPU MiB |" in markdown
    assert result["meta"]["device_name"].split()[0] in markdown
    for solver in ("g2d2", "red_diff", "dps", "pinv"):
        assert f"| {solver} |" in markdown
    assert result["meta"]["scale"] == "tiny" and result["meta"]["torch"]
