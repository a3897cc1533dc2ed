"""The state of every run of a sweep, read without touching a run folder: `make_table.py SWEEP --status`.

One line per cell x shard: done (summary.json, every image finished or failed), running (a live run holds
the folder's .lock), unfinished (started, not running: killed, preempted, waiting for its requeue, or
crashed), or missing (a shard of a cell with no folder at all), with its finished / expected and failed
images; then the overrides that resubmit what is neither done nor running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from g2d2.experiment.tables import _run_choices, shard_key

#: files that make a folder a run folder (Hydra's run.log alone: a job that started and stopped before its checks)
RUN_FILES = ("metrics.jsonl", "run_config.json", "summary.json", "shard.json", ".lock", "run.log")


@dataclass
class RunState:
    folder: Path
    task: str
    method: str
    shard: int
    num_shards: int
    state: str  # done | running | unfinished | missing
    finished: int = 0  # images with a record (ok or failed)
    failed: int = 0
    expected: int | None = None  # images the run was asked for (None: not known yet)
    method_key: str = "method"  # the override naming the method: method, or solver in a sweep without methods


def lock_held(folder: Path) -> bool:
    """Whether a live run holds `folder`/.lock (g2d2.experiment.runner.exclusive_folder's exclusive flock).

    Probed with a non-blocking shared flock on a read-only handle, released at once; a missing .lock is not
    held and is not created."""
    import fcntl

    try:
        handle = open(folder / ".lock", "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def run_state(folder: Path) -> RunState:
    """The state of one run folder, from its files (read only)."""
    summary, config, shard = (_json(folder / name) for name in ("summary.json", "run_config.json", "shard.json"))
    config = summary.get("config") or config
    choices = summary.get("choices") or _run_choices(folder)
    task = choices.get("task") or (config.get("task") or {}).get("name") or "?"
    method_key = "method" if choices.get("method") else "solver"
    method = choices.get(method_key) or "?"
    index, num_shards = shard_key(config) if config else (0, 1)
    statuses = []
    if (folder / "metrics.jsonl").exists():
        for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                statuses.append(json.loads(line).get("status"))
            except (json.JSONDecodeError, AttributeError):
                continue  # a partial last line: the run resumes it
    failed = sum(1 for status in statuses if status != "ok")
    expected = summary.get("num_expected")
    if expected is None and shard:
        expected = shard["stop"] - shard["start"]
    if lock_held(folder):
        state = "running"
    elif summary and (expected is None or len(statuses) >= expected):
        state = "done"
    else:
        state = "unfinished"
    return RunState(folder, str(task), str(method), index, num_shards, state, len(statuses), failed, expected,
                    method_key)


def sweep_states(root: str | Path) -> list[RunState]:
    """Every run folder below `root` (hidden folders such as .submitit/ and wandb/ left out), plus a "missing"
    entry for each shard of a cell that has no folder; sorted by cell and shard."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass the sweep folder of `scripts/run.py -m`")
    folders = {path.parent for name in RUN_FILES for path in root.rglob(name)
               if not any(part.startswith(".") or part == "wandb" for part in path.parent.relative_to(root).parts)}
    states = [run_state(folder) for folder in sorted(folders)]
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for s in states:
        cell = cells.setdefault((s.task, s.method), {"num_shards": 1, "seen": set(), "key": s.method_key})
        cell["num_shards"] = max(cell["num_shards"], s.num_shards)
        cell["seen"].add(s.shard)
    for (task, method), cell in cells.items():
        for shard in sorted(set(range(cell["num_shards"])) - cell["seen"]):
            states.append(RunState(root, task, method, shard, cell["num_shards"], "missing", method_key=cell["key"]))
    return sorted(states, key=lambda s: (s.task, s.method, s.num_shards, s.shard, str(s.folder)))


def status_report(root: str | Path) -> str:
    """The text `make_table.py SWEEP --status` prints: a count line, one line per run, the resubmit overrides."""
    root = Path(root)
    states = sweep_states(root)
    counts = {state: sum(1 for s in states if s.state == state)
              for state in ("done", "running", "unfinished", "missing")}
    failed = sum(s.failed for s in states)
    lines = [f"{root}: {len(states)} runs (" + ", ".join(f"{n} {state}" for state, n in counts.items()) + f"); "
             f"{failed} images failed"]
    width = max([len(f"{s.task} / {s.method}") for s in states] + [4])
    lines.append(f"{'cell':<{width}}  shard   state       images      failed  folder")
    for s in states:
        images = f"{s.finished}/{'?' if s.expected is None else s.expected}" if s.state != "missing" else "–"
        folder = "–" if s.state == "missing" else (s.folder.relative_to(root).as_posix() or ".")
        lines.append(f"{s.task + ' / ' + s.method:<{width}}  {f'{s.shard}/{s.num_shards}':<6}  {s.state:<10}  "
                     f"{images:<10}  {s.failed:<6}  {folder}")
    todo: dict[str, list[int]] = {}
    for s in states:
        if s.state in ("unfinished", "missing"):
            todo.setdefault(f"task={s.task} {s.method_key}={s.method}", []).append(s.shard)
    if todo:
        lines.append("to resubmit (add resume=true and the sweep's hydra.sweep.dir / subdir; see docs/scale_out.md):")
        for cell, shards in todo.items():
            lines.append(f"  {cell} data.shard={','.join(map(str, sorted(set(shards))))}")
    else:
        lines.append("nothing to resubmit")
    return "\n".join(lines) + "\n"
