"""Side-by-side reconstructions of a sweep: one row per (task, image), one column per method.

    python scripts/make_figure.py outputs/tables/tiny_table/<date> --out docs/reconstructions.png

Columns: ground truth, measurement (pseudo-inverse view), then each method's reconstruction, in the
order of --methods (default: every method found, pinv last). Reads the PNGs each run saved in images/.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from PIL import Image, ImageDraw

logger = logging.getLogger("make_figure")


def collect(sweep: Path) -> dict[tuple[str, str], Path]:
    """(task, method or solver) -> run folder, from each run's summary.json."""
    runs = {}
    for summary in sorted(sweep.rglob("summary.json")):
        choices = json.loads(summary.read_text()).get("choices", {})
        method = choices.get("method") or choices.get("solver")
        runs[(choices.get("task"), method)] = summary.parent
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=Path("reconstructions.png"))
    parser.add_argument("--methods", default=None, help="comma list of methods (columns), default: all")
    parser.add_argument("--images", default="0,1", help="comma list of image indices (rows per task)")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of each tile")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    runs = collect(args.sweep)
    if not runs:
        raise SystemExit(f"no summary.json under {args.sweep}")
    tasks = sorted({t for t, _ in runs})
    found = sorted({m for _, m in runs}, key=lambda m: (m == "pinv", m))
    methods = args.methods.split(",") if args.methods else found
    indices = [int(i) for i in args.images.split(",")]
    columns = ["ground truth", "measurement", *methods]

    tiles: list[list[Image.Image | None]] = []
    labels = []
    for task in tasks:
        for index in indices:
            row: list[Image.Image | None] = []
            any_run = next(runs[(task, m)] for m in methods if (task, m) in runs)
            gt = sorted((any_run / "images").glob(f"{index:05d}_*_gt.png"))
            meas = sorted((any_run / "images").glob(f"{index:05d}_*_measurement.png"))
            row += [Image.open(gt[0]) if gt else None, Image.open(meas[0]) if meas else None]
            for method in methods:
                recon = sorted((runs[(task, method)] / "images").glob(f"{index:05d}_*_recon.png")) if (
                    task, method) in runs else []
                row.append(Image.open(recon[0]) if recon else None)
            tiles.append(row)
            labels.append(f"{task} #{index}")

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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    logger.info("wrote %s (%d rows x %d columns)", args.out, len(tiles), len(columns))


if __name__ == "__main__":
    main()
