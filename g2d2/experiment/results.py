"""The machine-readable results of a run: metrics.jsonl (one flushed line per image) and summary.json.

metrics.jsonl is append-only. A process killed while writing leaves at most one partial last
line; `MetricsFile` detects it (no trailing newline, or not valid JSON), drops it and truncates the
file, so a resumed run starts from a valid file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any

from g2d2.errors import UserError

logger = logging.getLogger(__name__)

#: config keys that may differ between an interrupted run and its resumption (they do not change the numbers)
RESUME_FREE_KEYS = ("resume", "progress", "logger", "device", "save_images")
#: the per-image quality metrics aggregated in summary.json
QUALITY_KEYS = ("psnr", "ssim", "lpips")
COST_KEYS = ("seconds", "peak_gpu_mem_mb", "peak_rss_mb")


class ResultsError(UserError, ValueError):
    """A results file that cannot be read back (a corrupt metrics.jsonl line); the message names it."""


class MetricsFile:
    """Append-only JSON-lines file of per-image records.

    Args:
        path: the metrics.jsonl path (created on first append).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Valid records in file order. The last line, when partial or corrupt (a write interrupted by a
        kill), is dropped and truncated away; a corrupt line before it is not an interrupted write, and
        raises ValueError naming it instead of discarding the finished records after it."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.splitlines(keepends=True)
        records: list[dict[str, Any]] = []
        valid_bytes = 0
        for number, line in enumerate(lines, start=1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")  # killed mid-write
                records.append(json.loads(line))
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if number < len(lines):
                    raise ResultsError(
                        f"{self.path}: line {number} of {len(lines)} is not a JSON record ({err}); only the last "
                        "line can be an interrupted write. Repair or remove that line by hand, then resume"
                    ) from err
                break
            valid_bytes += len(line)
        if valid_bytes < len(raw):
            logger.warning(
                "%s: dropped %d bytes of a partial or corrupt line (an interrupted write)",
                self.path, len(raw) - valid_bytes,
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(valid_bytes)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, flushed and fsynced before returning."""
        line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _stats(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std and count of the finite values; `excluded` counts the others (missing, NaN, or
    +-inf such as the PSNR of a reconstruction equal to its ground truth), so a mean over fewer images
    than were finished is visible."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    excluded = len(values) - len(finite)
    if not finite:
        return {"mean": None, "std": None, "count": 0, "excluded": excluded}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "count": len(finite), "excluded": excluded}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means, sample standard deviations and counts of every metric over the successful images."""
    ok = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: r["index"])
    failed = [r for r in records if r.get("status") != "ok"]
    metrics = {key: _stats([r.get(key) for r in ok]) for key in QUALITY_KEYS + COST_KEYS}
    return {
        "num_images": len(ok),
        "num_failed": len(failed),
        "failed": [{"index": r["index"], "name": r.get("name"), "error": r.get("error")} for r in failed],
        "metrics": metrics,
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file and rename it over `path` (never a half-written file)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def config_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += config_diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]
