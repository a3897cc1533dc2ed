"""Turn a sweep folder into the paper's table: `python scripts/make_table.py SWEEP_DIR [options]`.

Reads every summary.json below SWEEP_DIR (recursively; run folders with only a metrics.jsonl are
unfinished runs: warned about and shown as "unfinished" cells), makes one table per experiment_name
(rows = solver (prior), columns = task, cells = mean +/- std over the images, plus the image
counts; the shards of a cell are merged over their per-image records), puts the published numbers of
g2d2/assets/published.yaml below ours, and writes Markdown and LaTeX to stdout (and to --out / its
.tex sibling). --status instead prints the state of every cell x shard (done / running / unfinished /
missing, finished and failed images) and what to resubmit, writing nothing.

Examples:
    python scripts/make_table.py outputs/tables/table_dps_ffhq/2025-01-01_12-00-00
    python scripts/make_table.py outputs/tables/tiny_table --metrics psnr,lpips --out tiny.md
    python scripts/make_table.py outputs/tables/table_g2d2_ffhq --wandb offline
    python scripts/make_table.py outputs/tables/table_g2d2_ffhq/paper --status
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from g2d2.experiment.tables import (
    LONG_COLUMNS,
    METRICS,
    TableError,
    build_tables,
    load_published,
    load_summaries,
    load_unfinished,
    long_rows,
    to_latex,
    to_markdown,
)

logger = logging.getLogger("make_table")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("root", type=Path, help="sweep folder (searched recursively for summary.json)")
    parser.add_argument("--metrics", default="psnr,ssim,lpips",
                        help=f"comma-separated, from {','.join(METRICS)} (default psnr,ssim,lpips)")
    parser.add_argument("--out", type=Path, default=None, help="write Markdown here and LaTeX to the .tex sibling")
    parser.add_argument("--no-published", action="store_true", help="leave out the published numbers")
    parser.add_argument("--wandb", choices=("offline", "online"), default=None,
                        help="also log each table to W&B (one run per experiment, job_type=table)")
    parser.add_argument("--wandb-project", default="g2d2", help="W&B project (default g2d2)")
    parser.add_argument("--wandb-entity", default=None, help="W&B entity")
    parser.add_argument("--status", action="store_true",
                        help="print the state of every cell x shard and what to resubmit; no table, nothing written")
    args = parser.parse_args(argv)
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown or not args.metrics:
        parser.error(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    return args


def log_to_wandb(tables, markdown: dict[str, str], mode: str, project: str, entity: str | None, root: Path) -> None:
    """One W&B run per experiment (grouped by its name): a long-format table and the Markdown."""
    import wandb

    for table in tables:
        run = wandb.init(project=project, entity=entity, group=table.experiment, job_type="table",
                         name=f"table-{table.experiment}", mode=mode, dir=str(root), reinit="finish_previous",
                         config={"experiment_name": table.experiment, "dataset": table.dataset,
                                 "lpips_net": table.lpips_net, "sweep_dir": str(root),
                                 "merged_shards": table.merged})  # "method / task" -> the shard folders merged
        run.log({"results": wandb.Table(columns=LONG_COLUMNS, data=long_rows(table)),
                 "table_markdown": wandb.Html(f"<pre>{markdown[table.experiment]}</pre>")})
        location = run.url if mode == "online" else run.dir
        run.finish()
        logger.info("W&B (%s): %s", mode, location)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.status:
        from g2d2.experiment.status import status_report

        try:
            sys.stdout.write(status_report(args.root))
        except FileNotFoundError as error:
            logger.error("%s", error)
            return 2
        return 0
    try:
        tables = build_tables(load_summaries(args.root), None if args.no_published else load_published(),
                              unfinished=load_unfinished(args.root))
    except (TableError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    markdown = {t.experiment: to_markdown(t, args.metrics) for t in tables}
    md = "\n".join(markdown.values())
    tex = "\n".join(to_latex(t, args.metrics) for t in tables)
    sys.stdout.write(md + "\n" + tex)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md, encoding="utf-8")
        args.out.with_suffix(".tex").write_text(tex, encoding="utf-8")
        logger.info("wrote %s and %s", args.out, args.out.with_suffix(".tex"))
    if args.wandb:
        log_to_wandb(tables, markdown, args.wandb, args.wandb_project, args.wandb_entity, args.root)
    return 0

