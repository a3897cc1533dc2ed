"""Results tables: the summary.json files of a sweep, side by side with the papers' numbers.

    summaries = load_summaries(sweep_dir)                 # every summary.json below the folder
    for table in build_tables(summaries):                 # one table per experiment_name
        markdown = to_markdown(table, ["psnr", "lpips"])

Rows are methods (solver, plus its prior), columns are tasks, cells are mean +/- std over the
images; the published rows come from g2d2/assets/published.yaml, matched on dataset and task.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

#: metric -> (display name, better direction, decimals)
METRICS: dict[str, tuple[str, str, int]] = {
    "psnr": ("PSNR [dB]", "higher", 2),
    "ssim": ("SSIM", "higher", 3),
    "lpips": ("LPIPS", "lower", 3),
    "fid": ("FID", "lower", 2),
}
#: column order of the known tasks (others follow alphabetically)
TASK_ORDER = ("sr4", "sr4_avgpool", "inpaint_box", "inpaint_random92", "inpaint_random", "gauss_deblur",
              "motion_deblur", "cs", "denoise")
#: row order of our solvers (others follow alphabetically, the no-prior pinv last)
SOLVER_ORDER = ("g2d2", "red_diff", "dps")
STATUSES = ("verified", "code", "secondary")


@dataclass
class Cell:
    """One metric of one (method, task): mean, sample std (None for published values) and count."""

    mean: float | None
    std: float | None = None
    n: int | None = None
    #: a footnote mark, e.g. for an LPIPS computed with another backbone
    mark: str = ""


@dataclass
class Row:
    label: str
    #: "ours" or the key of a published source
    source: str = "ours"
    status: str = "ours"
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)  # task -> metric -> Cell
    failed: dict[str, int] = field(default_factory=dict)  # task -> images that failed

    @property
    def published(self) -> bool:
        return self.source != "ours"


@dataclass
class Table:
    experiment: str
    dataset: str | None
    lpips_net: str | None
    tasks: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def load_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every summary.json below `root` (recursively), with its path under the key "_path"."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass the sweep folder of `scripts/run.py -m`")
    summaries = []
    for path in sorted(root.rglob("summary.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not {"metrics", "choices", "config"} <= set(data):
            logger.warning("%s is not a run summary (needs metrics, choices, config): skipped", path)
            continue
        data["_path"] = str(path)
        summaries.append(data)
    if not summaries:
        raise FileNotFoundError(f"no summary.json below {root}; did the runs finish?")
    return summaries


def load_published() -> dict[str, Any]:
    """The published numbers (g2d2/assets/published.yaml): {"sources": {...}, "entries": [...]}."""
    text = resources.files("g2d2").joinpath("assets/published.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    for entry in data["entries"]:
        if entry["status"] not in STATUSES or entry["source"] not in data["sources"]:
            raise ValueError(f"published.yaml entry {entry} has an unknown status or source")
    return data


def method_label(summary: dict[str, Any]) -> str:
    """'solver (prior)', or just 'solver' when the solver uses no prior (pinv)."""
    choices = summary["choices"]
    solver, prior = choices.get("solver", "?"), choices.get("prior")
    uses_prior = prior is not None
    target = summary["config"].get("solver", {}).get("_target_")
    if uses_prior and target:
        try:
            from hydra.utils import get_class

            uses_prior = get_class(target).prior_kind is not None
        except (ImportError, AttributeError, ValueError):
            pass
    return f"{solver} ({prior})" if uses_prior else str(solver)


def _order(items: list[str], first: tuple[str, ...]) -> list[str]:
    rank = {name: i for i, name in enumerate(first)}
    return sorted(items, key=lambda s: (rank.get(s, len(first)), s))


def _row_order(label: str) -> tuple[int, str]:
    solver = label.split(" ")[0]
    if solver == "pinv":
        return (len(SOLVER_ORDER) + 1, label)
    return (SOLVER_ORDER.index(solver) if solver in SOLVER_ORDER else len(SOLVER_ORDER), label)


def _common(summaries: list[dict[str, Any]], key: str, experiment: str) -> Any:
    values = Counter(json.dumps(s["config"].get(key), sort_keys=True) for s in summaries)
    if len(values) > 1:
        logger.warning("experiment %s mixes runs with different %s: %s", experiment, key, sorted(values))
    return json.loads(values.most_common(1)[0][0])


def our_table(experiment: str, summaries: list[dict[str, Any]]) -> Table:
    """The rows we measured for one experiment (duplicates: the run with the most images wins)."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for s in summaries:
        key = (method_label(s), s["choices"].get("task", "?"))
        if key in best:
            logger.warning("two runs for %s / %s: %s and %s; keeping the one with more images",
                           *key, best[key]["_path"], s["_path"])
            if s.get("num_images", 0) <= best[key].get("num_images", 0):
                continue
        best[key] = s
    rows: dict[str, Row] = {}
    for (label, task), s in best.items():
        row = rows.setdefault(label, Row(label))
        row.cells[task] = {
            m: Cell(v.get("mean"), v.get("std"), v.get("count"))
            for m, v in s["metrics"].items() if m in METRICS
        }
        row.failed[task] = int(s.get("num_failed", 0))
    tasks = _order(sorted({task for _, task in best}), TASK_ORDER)
    datasets = {s["choices"].get("data") for s in summaries}
    if len(datasets) > 1:
        logger.warning("experiment %s mixes data sets %s", experiment, sorted(map(str, datasets)))
    for key in ("seed", "data", "lpips_net"):
        _common(summaries, key, experiment)
    return Table(
        experiment=experiment,
        dataset=next(iter(datasets)) if len(datasets) == 1 else None,
        lpips_net=_common(summaries, "lpips_net", experiment),
        tasks=tasks,
        rows=[rows[label] for label in sorted(rows, key=_row_order)],
    )


def add_published(table: Table, published: dict[str, Any]) -> None:
    """Append the published rows whose dataset equals the table's and whose task is a column."""
    rows: dict[tuple[str, str], Row] = {}
    mismatched = False
    for e in published["entries"]:
        if e["dataset"] != table.dataset or e["task"] not in table.tasks:
            continue
        key = (e["method"], e["source"])
        row = rows.setdefault(key, Row(e["method"], source=e["source"], status=e["status"]))
        cells = {}
        for metric in METRICS:
            if e.get(metric) is None:
                continue
            mark = ""
            if metric == "lpips" and e.get("lpips_net") != table.lpips_net:
                mark, mismatched = "†", True
            cells[metric] = Cell(float(e[metric]), mark=mark)
        row.cells[e["task"]] = cells
    for (_, source), row in rows.items():
        citation = published["sources"][source]["citation"]
        tables = sorted({e["table"] for e in published["entries"]
                         if e["source"] == source and e["method"] == row.label and e["dataset"] == table.dataset})
        row.label = f"{row.label} — published: {citation}, {'; '.join(tables)} [{row.status}]"
        table.rows.append(row)
    if mismatched:
        table.notes.append(
            f"† LPIPS with another or an unknown backbone than ours ({table.lpips_net}): not comparable."
        )
    if rows:
        table.notes.append("Status: verified = paper text; code = official code comments; secondary = quoted by "
                           "others. Published rows have no std; FID is not computed here.")
    elif table.dataset is not None:
        table.notes.append(f"No published numbers for data={table.dataset}.")


def build_tables(summaries: list[dict[str, Any]], published: dict[str, Any] | None = None) -> list[Table]:
    """One Table per experiment_name found in the summaries, with published rows when given."""
    by_experiment: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        by_experiment.setdefault(str(s["config"].get("experiment_name", "default")), []).append(s)
    tables = []
    for experiment in sorted(by_experiment):
        table = our_table(experiment, by_experiment[experiment])
        if published is not None:
            add_published(table, published)
        tables.append(table)
    return tables


def format_cell(cell: Cell | None, metric: str, pm: str = "±") -> str:
    if cell is None or cell.mean is None or not math.isfinite(cell.mean):
        return "–"
    decimals = METRICS[metric][2]
    text = f"{cell.mean:.{decimals}f}"
    if cell.std is not None:
        text += f" {pm} {cell.std:.{decimals}f}"
    return text + cell.mark


def _metric_title(metric: str) -> str:
    name, better, _ = METRICS[metric]
    return f"{name} ({better} is better)"


def _images_text(row: Row, task: str) -> str:
    cell = next(iter(row.cells.get(task, {}).values()), None)
    if cell is None:
        return "–"
    failed = row.failed.get(task, 0)
    return f"{cell.n or 0}" + (f" ({failed} failed)" if failed else "")


def to_markdown(table: Table, metrics: list[str]) -> str:
    """One Markdown table per metric (ours, then published rows) and one of image counts."""
    header = f"| method | {' | '.join(table.tasks)} |\n|---|{'---|' * len(table.tasks)}"
    out = [f"## {table.experiment} (data: {table.dataset}, LPIPS: {table.lpips_net})", ""]
    for metric in metrics:
        rows = [r for r in table.rows if not r.published or any(metric in c for c in r.cells.values())]
        out += [f"### {_metric_title(metric)}", "", header]
        for r in rows:
            label = f"*{r.label}*" if r.published else r.label
            cells = [format_cell(r.cells.get(t, {}).get(metric), metric) for t in table.tasks]
            out.append(f"| {label} | {' | '.join(cells)} |")
        out.append("")
    out += ["### Images per cell", "", header]
    for r in (r for r in table.rows if not r.published):
        out.append(f"| {r.label} | {' | '.join(_images_text(r, t) for t in table.tasks)} |")
    out.append("")
    out += [f"{note}  " for note in table.notes]
    return "\n".join(out).rstrip() + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("†", r"$^\dagger$"), ("—", "---"), ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def to_latex(table: Table, metrics: list[str]) -> str:
    """One booktabs tabular per metric, the published rows below a rule."""
    out = [f"% {table.experiment} (data: {table.dataset}, LPIPS: {table.lpips_net}); needs \\usepackage{{booktabs}}"]
    for metric in metrics:
        out += [r"\begin{tabular}{l" + "c" * len(table.tasks) + "}", r"\toprule",
                f"{_tex(_metric_title(metric))} & " + " & ".join(_tex(t) for t in table.tasks) + r" \\", r"\midrule"]
        ours = [r for r in table.rows if not r.published]
        theirs = [r for r in table.rows if r.published and any(metric in c for c in r.cells.values())]
        for i, group in enumerate((ours, theirs)):
            if i and group:
                out.append(r"\midrule")
            for r in group:
                cells = [_tex(format_cell(r.cells.get(t, {}).get(metric), metric)) for t in table.tasks]
                out.append(_tex(r.label) + " & " + " & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", ""]
    out += [f"% {_tex(note)}" for note in table.notes]
    return "\n".join(out) + "\n"


def long_rows(table: Table) -> list[list[Any]]:
    """[experiment, method, source, status, task, metric, mean, std, n] for every cell (W&B table)."""
    rows = []
    for r in table.rows:
        for task, cells in r.cells.items():
            for metric, c in cells.items():
                rows.append([table.experiment, r.label, r.source, r.status, task, metric, c.mean, c.std, c.n])
    return rows


LONG_COLUMNS = ["experiment", "method", "source", "status", "task", "metric", "mean", "std", "n"]
