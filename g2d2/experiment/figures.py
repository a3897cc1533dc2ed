"""Side-by-side reconstructions of a sweep: one row per (task, image), one column per method.

    python scripts/make_figure.py outputs/tables/tiny_table/<date> --out docs/reconstructions.png

Columns: ground truth, measurement (pseudo-inverse view), then each method's reconstruction, in the
order of --methods (default: every method found, in make_table's row order: g2d2, red_diff, dps, others,
pinv last). Rows: the tasks in make_table's column order, one per image index that has a saved image.
Reads the PNGs each run saved in images/; writes <sweep>/reconstructions.png unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from PIL import Image, ImageDraw

from g2d2.experiment.tables import SOLVER_ORDER, TASK_ORDER

logger = logging.getLogger("make_figure")


def collect(sweep: Path) -> tuple[dict[tuple[str, str], list[Path]], dict[str, str]]:
    """(task, method or solver) -> its run folders (one, or the shards of a cell: images are named by their
    global index), and method -> solver, from each run's summary.json."""
    runs: dict[tuple[str, str], list[Path]] = {}
    solvers = {}
    for summary in sorted(sweep.rglob("summary.json")):
        choices = json.loads(summary.read_text()).get("choices", {})
        method = choices.get("method") or choices.get("solver")
        runs.setdefault((choices.get("task"), method), []).append(summary.parent)
        solvers[method] = choices.get("solver") or method
    return runs, solvers


def table_order(names: set[str], first: tuple[str, ...], key=lambda name: name) -> list[str]:
    """`names` in make_table's order: those whose key is in `first` by its position, then alphabetically,
    the no-prior pinv last."""
    rank = {name: i for i, name in enumerate(first)}
    return sorted(names, key=lambda n: (key(n) == "pinv", rank.get(key(n), len(first)), n))


def _first(folders: list[Path], index: int, suffix: str) -> Path | None:
    found = sorted(p for folder in folders for p in (folder / "images").glob(f"{index:05d}_*_{suffix}.png"))
    return found[0] if found else None


def build_rows(runs: dict[tuple[str, str], list[Path]], tasks: list[str], methods: list[str],
               indices: list[int]) -> tuple[list[list[Image.Image | None]], list[str]]:
    """One row per (task, index): ground truth and measurement from any run of the task that saved them
    (the chosen methods first), then each method's reconstruction (None where missing)."""
    tiles: list[list[Image.Image | None]] = []
    labels = []
    for task in tasks:
        task_runs = [runs[(task, m)] for m in methods if (task, m) in runs]
        task_runs += [run for (t, m), run in sorted(runs.items()) if t == task and m not in methods]
        for index in indices:
            row: list[Image.Image | None] = []
            for suffix in ("gt", "measurement"):
                path = next((p for run in task_runs if (p := _first(run, index, suffix)) is not None), None)
                if path is None:
                    logger.warning("no %s image for %s #%d in any run", suffix, task, index)
                row.append(Image.open(path) if path is not None else None)
            for method in methods:
                recon = _first(runs[(task, method)], index, "recon") if (task, method) in runs else None
                row.append(Image.open(recon) if recon is not None else None)
            if all(tile is None for tile in row):
                continue  # e.g. --images 0,1 on a run of one image: no empty row
            tiles.append(row)
            labels.append(f"{task} #{index}")
    return tiles, labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep>/reconstructions.png")
    parser.add_argument("--methods", default=None, help="comma list of methods (columns), default: all")
    parser.add_argument("--images", default="0,1", help="comma list of image indices (rows per task)")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of each tile")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    runs, solvers = collect(args.sweep)
    if not runs:
        raise SystemExit(f"no summary.json under {args.sweep}")
    tasks = table_order({t for t, _ in runs}, TASK_ORDER)
    found = table_order({m for _, m in runs}, SOLVER_ORDER, key=solvers.get)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else found
    missing = [m for m in methods if m not in found]
    if missing:
        raise SystemExit(f"method(s) {missing} have no run under {args.sweep}; available: {found}")
    try:
        indices = [int(i) for i in args.images.split(",")]
    except ValueError:
        raise SystemExit(f"--images must be a comma list of integers, got {args.images!r}") from None
    columns = ["ground truth", "measurement", *methods]

    tiles, labels = build_rows(runs, tasks, methods, indices)
    if not any(t is not None for row in tiles for t in row):
        saved = sorted({int(p.name[:5]) for cell in runs.values() for run in cell
                        for p in (run / "images").glob("*_recon.png") if p.name[:5].isdigit()})
        raise SystemExit(f"no saved image for index {indices} of methods {methods} under {args.sweep}; "
                         f"indices with a saved reconstruction: {saved or 'none (save_images=false?)'}")

    size = next(t for row in tiles for t in row if t is not None).size[0] * args.scale
    left, top, pad = 110, 18, 2
    canvas = Image.new("RGB", (left + len(columns) * (size + pad), top + len(tiles) * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((left + c * (size + pad) + 2, 3), name, fill="black")
    for r, (row, label) in enumerate(zip(tiles, labels, strict=True)):
        y = top + r * (size + pad)
        draw.text((4, y + size // 2 - 6), label, fill="black")
        for c, tile in enumerate(row):
            if tile is not None:
                canvas.paste(tile.resize((size, size), Image.Resampling.NEAREST), (left + c * (size + pad), y))
    out = args.out if args.out is not None else args.sweep / "reconstructions.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    logger.info("wrote %s (%d rows x %d columns)", out, len(tiles), len(columns))
