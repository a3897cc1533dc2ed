"""Smoke test of scripts/benchmark.py at tiny scale on the CPU (the GPU run uses --scale full), the proof that its
rows are composed as run.py composes them, and unit tests of its step clock and host-sync counter (g2d2.bench.timing)
with a toy solver and a fake clock."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from g2d2.bench import cli, models, profiling, report, rows, timing
from g2d2.experiment.runner import build_prior, image_generator, pose_batch
from g2d2.solvers.base import NonFiniteError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmark.py"
PIXEL_STEPS = 2  # --measure-steps-pixel of the tiny run (G2D2 keeps --measure-steps 1)
SYNC_MESSAGE = "called a synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") warns


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, str(SCRIPT), "--scale", "tiny", "--device", "cpu", "--measure-steps", "1",
        "--measure-steps-pixel", str(PIXEL_STEPS),
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
    rows = result["rows"]
    assert {r["solver"] for r in rows} == {"g2d2", "red_diff", "dps", "pinv"}
    for r in rows:
        assert r["status"] == "ok", r
        assert math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0, r
        assert math.isfinite(r["s_per_image"]) and r["s_per_image"] >= r["s_per_step"], r
        assert r["peak_gpu_mib"] is None  # CPU run: no GPU figure, peak RSS instead
        assert r["peak_rss_mib"] > 0
        assert r["host_syncs_per_step"] is None  # the sync counter is CUDA only
    for r in rows:
        if r["solver"] != "pinv":
            expected = 1 if r["solver"] == "g2d2" else PIXEL_STEPS
            assert r["steps_timed"] == r["measure_steps"] == expected, r
            assert r["warmup_steps"] == 1
            assert r["bare_s_per_step"] > 0 and math.isfinite(r["overhead"]), r
            assert r["precision"] in ("fp32", "fp16")
    # pixel priors get at least as many bare repetitions as timed steps; G2D2 the tiny default
    assert all(r["bare_reps"] >= PIXEL_STEPS for r in rows if r["solver"] in ("dps", "red_diff"))
    assert next(r for r in rows if r["solver"] == "g2d2")["bare_reps"] == 2
    assert result["meta"]["measure_steps_pixel"] == PIXEL_STEPS
    # paper step counts are what is extrapolated to
    g2d2 = next(r for r in rows if r["solver"] == "g2d2")
    assert (g2d2["num_steps"], g2d2["inner_iters"]) == (100, 30)
    assert g2d2["bare_s_per_step"] == pytest.approx(g2d2["transformer_s"] + 30 * g2d2["decode_fwd_bwd_s"])
    assert {r["num_steps"] for r in rows if r["solver"] in ("dps", "red_diff")} == {1000}
    # every pixel solver ran on both ADM shapes at both precisions
    assert len([r for r in rows if r["solver"] == "dps"]) == 4


def test_tiny_benchmark_markdown(tiny_run: tuple[dict, str, float]) -> None:
    result, markdown, _ = tiny_run
    assert "| solver | prior shape | precision | batch | peak GPU MiB |" in markdown
    assert "| s/image (extrap.) | images/h |" in markdown
    assert "| host syncs/step | status |" in markdown and "only at the two edges" in markdown
    assert result["meta"]["device_name"].split()[0] in markdown
    for solver in ("g2d2", "red_diff", "dps", "pinv"):
        assert f"| {solver} |" in markdown
    assert result["meta"]["scale"] == "tiny" and result["meta"]["torch"]


def _resolved(cfg) -> dict:
    out = {key: OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else None
           for key in ("solver", "noise_schedule", "prior")}
    return {**out, "batch_size": cfg.batch_size}


def test_tiny_benchmark_rows_are_run_py_configs(tiny_run: tuple[dict, str, float]) -> None:
    """Each row's solver, noise schedule and prior are run.py's composition of the row's overrides: its method's
    schedule (RED-Diff: the leading grid) and the method's values (G2D2 on ImageNet: the public KL form)."""
    result, _, _ = tiny_run
    for r in result["rows"]:
        assert r["config"] == _resolved(compose_config(r["overrides"])), r["overrides"]
    schedules = {r["solver"]: r["config"]["noise_schedule"] for r in result["rows"]}
    assert schedules["red_diff"] == {"_target_": "g2d2.noise.ddpm.DDPMTimesteps", "spacing": "leading"}
    assert schedules["dps"] == {"_target_": "g2d2.noise.ddpm.DDPMTimesteps", "spacing": "linspace"}
    g2d2 = next(r for r in result["rows"] if r["solver"] == "g2d2")
    method = _resolved(compose_config([rows.method_override("g2d2_imagenet")]))
    assert g2d2["config"]["solver"] == method["solver"] and g2d2["config"]["noise_schedule"] == method["noise_schedule"]
    assert g2d2["config"]["prior"]["prompt"] == "a photo of a tench" and g2d2["config"]["prior"]["guidance_scale"] == 5


@pytest.mark.usefixtures("one_thread")
def test_red_diff_row_on_the_tiny_prior_times_what_run_py_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """RED-Diff on the embedded tiny prior: the row's config equals `python scripts/run.py +method=red_diff_tiny
    batch_size=B` composed by Hydra at each batch size, and the solver the row times is built from it (ddpm_leading
    grid). Without the override run.py solves this prior 4 at a time (conf/setting): the row at batch 1 must not."""
    args = cli.parse_args(["--scale", "tiny", "--device", "cpu", "--measure-steps-pixel", "1", "--bare-reps", "1"])
    for batch_size in (1, 4, 16):
        overrides = rows.row_overrides("red_diff_tiny", None, 64, "fp32", False, args, batch_size=batch_size)
        run_py = compose_config([rows.method_override("red_diff_tiny"), f"batch_size={batch_size}"])  # as typed
        assert _resolved(rows.compose_run_config(overrides)) == _resolved(run_py)
        assert run_py.batch_size == batch_size
    assert compose_config([rows.method_override("red_diff_tiny")]).batch_size == 4
    overrides = rows.row_overrides("red_diff_tiny", None, 64, "fp32", False, args)
    cfg = rows.compose_run_config(overrides)
    run_py = compose_config([rows.method_override("red_diff_tiny"), "batch_size=1"])
    assert _resolved(cfg) == _resolved(run_py) and cfg.batch_size == 1
    assert cfg.noise_schedule.spacing == "leading"
    timed = []
    build_solver = rows.build_solver
    monkeypatch.setattr(rows, "build_solver", lambda c: timed.append(build_solver(c)) or timed[-1])
    row = rows.run_solver("red_diff", cfg, build_prior(cfg, torch.device("cpu")), "tiny_ddpm", "fp32", args,
                          torch.device("cpu"))
    assert row["status"] == "ok" and row["steps_timed"] == 1, row
    (solver,) = timed
    assert solver.noise_schedule.spacing == "leading"
    assert (row["num_steps"], solver.lr) == (run_py.solver.num_steps, run_py.solver.lr)


BATCH_SIZES = (1, 3)  # --batch-sizes of the batch run


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """G2D2 (tiny ITHQ shapes), DPS (tiny ADM FFHQ) and pinv at batch 1 and 3, one precision."""
    out = tmp_path_factory.mktemp("bench_batch")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, str(SCRIPT), "--scale", "tiny", "--device", "cpu", "--solvers", "g2d2,dps,pinv",
        "--discrete-priors", "vq_diffusion_ithq", "--pixel-priors", "adm_ffhq", "--precisions", "fp32",
        "--batch-sizes", ",".join(map(str, reversed(BATCH_SIZES))), "--measure-steps", "1",
        "--measure-steps-pixel", "2", "--bare-reps", "1",
        "--out", str(out / "b.json"), "--markdown", str(out / "b.md"), "--workdir", str(out / "ckpt"),
    ]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"benchmark.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads((out / "b.json").read_text()), (out / "b.md").read_text()


def test_batch_rows_throughput(batch_run: tuple[dict, str]) -> None:
    """Every row at every batch size, ascending; s/solve = s/step x steps, s/image = s/solve / B and
    images/h = 3600 B / s/solve; each row's config is run.py's with batch_size=B."""
    result, markdown = batch_run
    assert result["meta"]["batch_sizes"] == list(BATCH_SIZES)
    got = [(r["solver"], r["batch_size"]) for r in result["rows"]]
    assert got == [(s, b) for s in ("pinv", "g2d2", "dps") for b in BATCH_SIZES]
    for r in result["rows"]:
        b = r["batch_size"]
        assert r["status"] == "ok", r
        assert f"batch_size={b}" in r["overrides"] and r["config"]["batch_size"] == b
        assert r["config"] == _resolved(compose_config(r["overrides"])), r["overrides"]
        assert r["s_per_solve"] == pytest.approx(r["s_per_step"] * r["num_steps"])
        assert r["s_per_image"] == pytest.approx(r["s_per_solve"] / b)
        assert r["images_per_hour"] == pytest.approx(3600 * b / r["s_per_solve"])
        assert r["images_per_hour"] * r["s_per_image"] == pytest.approx(3600)
        if r["solver"] == "g2d2":
            assert r["bare_s_per_step"] == pytest.approx(r["transformer_s"] + 30 * r["decode_fwd_bwd_s"])
        images_h = f"{r['images_per_hour']:.0f}" if r["images_per_hour"] >= 100 else f"{r['images_per_hour']:.3g}"
        assert f"| {r['precision']} | {b} |" in markdown and f"| {images_h} |" in markdown
    assert "| batch 1, 3 |" in markdown


def _fake_window(**kwargs) -> dict:
    return {"s_per_step": 0.5, "steps_timed": 1, "host_syncs_per_step": None, "peak_gpu_mib": None}


@pytest.mark.usefixtures("one_thread")
def test_batch_row_poses_the_runner_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row at batch 3 solves images 0..2 as the runner poses them: each image's own operator draw (random
    inpainting masks from image_generator(seed, i)), one measurement row per image, one generator per image
    passed to the solve; throughput from s/step."""
    args = cli.parse_args(["--scale", "tiny", "--device", "cpu", "--task", "inpaint_random", "--seed", "5",
                           "--measure-steps-pixel", "1", "--bare-reps", "1"])
    cfg = rows.compose_run_config(rows.row_overrides("red_diff_tiny", None, 64, "fp32", False, args, batch_size=3))
    seen = []
    monkeypatch.setattr(rows.timing, "measure_solve",
                        lambda solver, prior, net, operator, y, *a: seen.append((operator, y, a[3])) or _fake_window())
    row = rows.run_solver("red_diff", cfg, build_prior(cfg, torch.device("cpu")), "tiny_ddpm", "fp32", args,
                          torch.device("cpu"))
    assert row["status"] == "ok" and row["batch_size"] == 3, row
    ((operator, y, generators),) = seen
    assert y.shape == (3, 3, 64, 64)
    masks = [instantiate(cfg.task.operator, generator=image_generator(5, i)).state()["mask"] for i in range(3)]
    # the solve gets the runner's per-image generators, in the state pose_batch leaves them (operator, noise drawn)
    _, posed, _ = pose_batch(cfg, torch.zeros(3, 3, 64, 64), [0, 1, 2], torch.device("cpu"))
    assert len(generators) == 3
    assert all(torch.equal(g.get_state(), p.get_state()) for g, p in zip(generators, posed, strict=True))
    assert not torch.equal(generators[0].get_state(), image_generator(5, 0).get_state())
    assert len(operator.operators) == 3
    assert all(torch.equal(op.state()["mask"], m) for op, m in zip(operator.operators, masks, strict=True))
    assert not torch.equal(masks[0], masks[1])
    steps = cfg.solver.num_steps
    assert (row["s_per_solve"], row["s_per_image"]) == pytest.approx((0.5 * steps, 0.5 * steps / 3))
    assert row["images_per_hour"] == pytest.approx(3600 * 3 / (0.5 * steps))
    assert row["bare_s_per_step"] > 0


@pytest.mark.usefixtures("one_thread")
def test_out_of_memory_at_a_batch_size_is_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch size that runs out of memory gives an "oom" row, the solver's larger sizes "skipped" rows, and the
    run goes on (the next precision starts again from the smallest size); the Markdown says so."""
    args = cli.parse_args(["--scale", "tiny", "--device", "cpu", "--solvers", "red_diff", "--precisions",
                           "fp32,bf16", "--batch-sizes", "1,2,4", "--measure-steps-pixel", "1", "--bare-reps", "1"])

    def measure(solver, prior, net, operator, y, *a, **k) -> dict:
        if y.shape[0] >= 2 and prior.unet.dtype == torch.float32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _fake_window()

    monkeypatch.setattr(rows.timing, "measure_solve", measure)
    out = []
    rows.run_group("adm_ffhq", ["red_diff"], tmp_path, args, torch.device("cpu"), out.append, lambda: False)
    assert [(r["precision"], r["batch_size"], r["status"]) for r in out] == [
        ("fp32", 1, "ok"), ("fp32", 2, "oom"), ("fp32", 4, "skipped"),
        ("bf16", 1, "ok"), ("bf16", 2, "ok"), ("bf16", 4, "ok"),
    ]
    assert out[2]["error"] == "out of memory at batch 2" and "OutOfMemoryError" in out[1]["error"]
    text = report.markdown({"meta": {**cli._meta(args, torch.device("cpu")), "device_name": "cpu"}, "rows": out,
                            "ratios": []})
    assert "| fp32 | 2 |" in text and "| oom: OutOfMemoryError: CUDA out of memory" in text
    assert "| skipped: out of memory at batch 2 |" in text


def test_batch_sizes_option() -> None:
    assert cli.parse_args(["--batch-sizes", "16,1,4,4"]).batch_sizes == [1, 4, 16]
    assert cli.parse_args([]).batch_sizes == [1]
    for bad in ("0,4", "a", ","):
        with pytest.raises(SystemExit):
            cli.parse_args(["--batch-sizes", bad])


def test_cpu_scale_keeps_ithq_shapes_and_refuses_other_priors(capsys: pytest.CaptureFixture) -> None:
    """--scale cpu: ITHQ's image size, f = 8, token grid and codebook (only the widths shrink), one thread; any
    solver or prior it has no shapes for is refused before anything is built."""
    (vq_full, tr_full, _), (vq_cpu, tr_cpu, _) = models.VQ_SHAPES["full"], models.VQ_SHAPES["cpu"]
    for key in ("num_vq_embeddings", "sample_size", "down_block_types", "up_block_types"):
        assert vq_cpu[key] == vq_full[key]
    assert len(vq_cpu["block_out_channels"]) == len(vq_full["block_out_channels"])
    for key in ("sample_size", "num_vector_embeds"):
        assert tr_cpu[key] == tr_full[key]
    args = cli.parse_args(["--scale", "cpu", "--device", "cpu", "--solvers", "g2d2,pinv",
                           "--discrete-priors", "vq_diffusion_ithq"])
    assert (args.threads, args.pinv_size) == (1, 256)
    for bad in (["--solvers", "g2d2,dps", "--discrete-priors", "vq_diffusion_ithq"], ["--solvers", "g2d2"]):
        with pytest.raises(SystemExit):
            cli.parse_args(["--scale", "cpu", *bad])
        assert "--scale cpu has VQ-Diffusion ITHQ shapes only" in capsys.readouterr().err


def test_trailing_overrides_reach_every_row() -> None:
    """`python scripts/benchmark.py ... noise_schedule=ddpm` changes the rows as it changes run.py's config."""
    args = cli.parse_args(["--scale", "tiny", "--device", "cpu", "noise_schedule=ddpm", "task.sigma=0.1"])
    cfg = rows.compose_run_config(rows.row_overrides("red_diff_ffhq", Path("/x y/ckpt"), 32, "fp16", True, args))
    assert cfg.noise_schedule.spacing == "linspace" and cfg.task.sigma == 0.1
    assert (cfg.prior.path, cfg.precision, cfg.gradient_checkpointing) == ("/x y/ckpt", "fp16", True)


# ----------------------------------------------------------------- step clock and sync counter, no subprocess
class ToyNet(torch.nn.Module):
    """The "prior network": step k lasts k + 1 fake seconds and makes k synchronising calls."""

    def __init__(self, now: list[float]) -> None:
        super().__init__()
        self.now, self.calls = now, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            warnings.warn(SYNC_MESSAGE, stacklevel=1)
        self.calls += 1
        self.now[0] += self.calls
        return x + 1


class ToySolver:
    """Calls the network once per outer step; optionally diverges at step `fail_at`."""

    def __init__(self, num_steps: int, fail_at: int | None = None) -> None:
        self.num_steps, self.fail_at = num_steps, fail_at

    def solve(self, prior, operator, y, generator=None) -> torch.Tensor:
        x = torch.zeros(1)
        for k in range(self.num_steps):
            if k == self.fail_at:
                raise NonFiniteError(f"non-finite at step {k}")
            x = prior(x)
        return x


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch):
    """(now, sync stamps): time.perf_counter reads `now`; timing.sync records when it is called and warns
    like a synchronising CUDA call (which the counter must not count)."""
    now, syncs = [0.0], []

    def sync(device: torch.device) -> None:
        syncs.append(now[0])
        warnings.warn(SYNC_MESSAGE, stacklevel=1)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(timing, "sync", sync)
    return now, syncs


def _measure(net: ToyNet, solver: ToySolver, warmup: int, measure: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy's sync warnings, when nothing records them
        return timing.measure_solve(solver, net, net, None, None, torch.device("cpu"), warmup, measure, None)


def test_step_clock_syncs_only_at_window_edges(fake_clock) -> None:
    now, syncs = fake_clock
    net = ToyNet(now)
    out = _measure(net, ToySolver(num_steps=10), warmup=2, measure=3)
    # step k starts at 1 + 2 + ... + k: the window is [start of step 2, start of step 5] = [3, 15]
    assert syncs == [3.0, 15.0]  # no synchronisation at the intermediate steps
    assert net.calls == 5  # stopped at the start of step 5, before its network call
    assert out["steps_timed"] == 3
    assert out["s_per_step"] == pytest.approx((15.0 - 3.0) / 3)
    assert out["host_syncs_per_step"] is None and out["peak_gpu_mib"] is None and "note" not in out


def test_step_clock_end_of_solve_and_divergence(fake_clock) -> None:
    now, syncs = fake_clock
    out = _measure(ToyNet(now), ToySolver(num_steps=4), warmup=1, measure=5)  # fewer steps than asked
    assert syncs == [1.0, 10.0] and out["steps_timed"] == 3
    assert out["s_per_step"] == pytest.approx((10.0 - 1.0) / 3)
    now[0], syncs[:] = 0.0, []
    out = _measure(ToyNet(now), ToySolver(num_steps=10, fail_at=4), warmup=1, measure=5)
    assert syncs == [1.0, 10.0] and out["steps_timed"] == 3  # steps 1..3 before the divergence at step 4
    assert out["s_per_step"] == pytest.approx(3.0) and out["note"].startswith("stopped early")
    now[0], syncs[:] = 0.0, []
    out = _measure(ToyNet(now), ToySolver(num_steps=2), warmup=3, measure=2)  # ends within the warm-up
    assert syncs == [3.0] and out["steps_timed"] == 2 and out["s_per_step"] == pytest.approx(1.5)
    assert "warm-up" in out["note"]


def test_host_syncs_counted_in_the_window_only(fake_clock, monkeypatch: pytest.MonkeyPatch) -> None:
    now, syncs = fake_clock

    @contextlib.contextmanager
    def recording(device: torch.device, enabled: bool = True):
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            yield log

    monkeypatch.setattr(timing, "host_sync_log", recording)
    out = _measure(ToyNet(now), ToySolver(num_steps=10), warmup=1, measure=3)
    # steps 1, 2, 3 make 1 + 2 + 3 syncs; the warm-up step's and the window edges' (fake_clock warns) excluded
    assert len(syncs) == 2 and out["steps_timed"] == 3
    assert out["host_syncs_per_step"] == pytest.approx(6 / 3)


def test_host_sync_log_restores_mode_and_never_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")  # nothing touches a GPU: the sync debug mode functions are faked
    with timing.host_sync_log(torch.device("cpu")) as log:
        assert log is None
    with timing.host_sync_log(cuda, enabled=False) as log:
        assert log is None
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.warns(UserWarning, match="unrelated") as replayed:  # other warnings: replayed once, not swallowed
        with timing.host_sync_log(cuda) as log:
            for _ in range(3):
                warnings.warn(SYNC_MESSAGE, stacklevel=1)
                warnings.warn("unrelated", stacklevel=1)
    assert modes == ["warn", 0] and sum(map(timing.is_sync_warning, log)) == 3
    assert [str(w.message) for w in replayed] == ["unrelated"]

    def broken(mode) -> None:
        raise RuntimeError("no sync debug mode here")

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", broken)
    with timing.host_sync_log(cuda) as log:  # failing to set: no count, no error
        assert log is None
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: broken(mode) if mode != "warn" else None)
    with timing.host_sync_log(cuda) as log:  # failing to restore: logged, no error
        assert log == []


def test_checkpointing_rows_and_profiled_steps(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, str(SCRIPT), "--scale", "tiny", "--device", "cpu", "--solvers", "dps",
        "--pixel-priors", "adm_ffhq", "--precisions", "fp32,amp_bf16", "--checkpointing", "both",
        "--measure-steps-pixel", "1", "--bare-reps", "1", "--profile", str(tmp_path / "profiles"),
        "--out", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md"), "--workdir", str(tmp_path / "ckpt"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["precision"], r["checkpointing"], r["status"]) for r in rows] == [
        ("fp32", False, "ok"), ("fp32+ckpt", True, "ok"), ("amp_bf16", False, "ok"), ("amp_bf16+ckpt", True, "ok")
    ]
    for r in rows:  # one profiled DPS step per row: the UNet's convolutions are in the table
        text = Path(r["profile"]).read_text()
        assert "sorted by self_cpu_time_total" in text and "aten::convolution" in text


def test_a_failing_profiled_step_leaves_no_profiler_running(tmp_path) -> None:
    """A solve that fails inside the profiled step (NaN, OOM) must not leave the profiler on: every later
    row would be timed under it."""
    network = torch.nn.Linear(2, 2)

    class FailsInStepTwo:
        def solve(self, prior, operator, y, generator):
            network(torch.ones(1, 2))  # warm-up step
            network(torch.ones(1, 2))  # the profiled step starts here ...
            raise NonFiniteError("diverged")  # ... and fails

    with pytest.raises(NonFiniteError):
        profiling.profile_step(FailsInStepTwo(), None, network, None, None, torch.device("cpu"), tmp_path / "p.txt",
                               None)
    assert not torch.autograd.profiler._is_profiler_enabled
    assert not network._forward_pre_hooks
