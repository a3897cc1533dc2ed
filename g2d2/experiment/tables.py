"""Results tables: the summary.json files of a sweep, side by side with the papers' numbers.

    summaries = load_summaries(sweep_dir)                 # every summary.json below the folder
    for table in build_tables(summaries):                 # one table per experiment_name
        markdown = to_markdown(table, ["psnr", "lpips"])

Rows are methods (solver, plus its prior), columns are tasks, cells are mean +/- std over the
images (the mean alone for one image); the published rows come from g2d2/assets/published.yaml,
matched on dataset and task. The shards of a cell (runs with data.shard / data.num_shards) are merged
into one cell: its mean and std are those of the union of their per-image records (metrics.jsonl).
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

from g2d2.experiment.results import RESUME_FREE_KEYS, config_diff, summarize

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
    images: dict[str, int] = field(default_factory=dict)  # task -> images that finished ok
    expected: dict[str, int | None] = field(default_factory=dict)  # task -> images asked for (None: unknown)
    excluded: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> metric -> values left out
    unfinished: dict[str, str] = field(default_factory=dict)  # task -> why the cell has no numbers

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
    #: "method / task" -> the run folders of the shards merged into that cell
    merged: dict[str, list[str]] = field(default_factory=dict)


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
        unfinished = sum(1 for p in root.rglob("metrics.jsonl") if not (p.parent / "summary.json").exists())
        hint = f" ({unfinished} run folders have metrics.jsonl only: unfinished)" if unfinished else ""
        raise FileNotFoundError(f"no summary.json below {root}; did the runs finish?{hint}")
    return summaries


def _run_choices(folder: Path) -> dict[str, Any]:
    """hydra.runtime.choices of a run folder (from .hydra/hydra.yaml), {} when unknown."""
    hydra_yaml = folder / ".hydra" / "hydra.yaml"
    if not hydra_yaml.exists():
        return {}
    try:
        data = yaml.safe_load(hydra_yaml.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    return dict(data.get("hydra", {}).get("runtime", {}).get("choices") or {})


def load_unfinished(root: str | Path) -> list[dict[str, Any]]:
    """Run folders below `root` with a metrics.jsonl but no summary.json (killed or still running).

    Each: {"_path", "choices", "config", "done", "failed"}; choices come from .hydra/hydra.yaml and the
    config from run_config.json (either may be empty when missing). Every one is logged as a warning.
    """
    runs = []
    for metrics in sorted(Path(root).rglob("metrics.jsonl")):
        folder = metrics.parent
        if (folder / "summary.json").exists():
            continue
        statuses = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                statuses.append(json.loads(line).get("status"))
            except (json.JSONDecodeError, AttributeError):
                continue
        config: dict[str, Any] = {}
        if (folder / "run_config.json").exists():
            try:
                config = json.loads((folder / "run_config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                config = {}
        run = {"_path": str(folder), "choices": _run_choices(folder), "config": config,
               "done": statuses.count("ok"), "failed": sum(1 for st in statuses if st not in (None, "ok"))}
        logger.warning("%s has metrics.jsonl (%d images done, %d failed) but no summary.json: unfinished run, "
                       "not in the means", folder, run["done"], run["failed"])
        runs.append(run)
    return runs


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


#: config keys (dotted; a key covers its sub-keys) that may differ between two runs of one cell: those a resume
#: may change, plus where the run was written and data.limit (how many images, which the image counts show)
PROTOCOL_FREE_KEYS = (*RESUME_FREE_KEYS, "hydra", "output_dir", "data.limit")


class TableError(ValueError):
    """Runs that cannot be put in one table; the message names the folders and what to do."""


#: config keys in which the shards of one cell differ
SHARD_CONFIG_KEYS = ("data.shard", "data.num_shards")


def protocol_differences(a: dict[str, Any], b: dict[str, Any], free_keys: tuple[str, ...] = ()) -> list[str]:
    """Dotted config keys whose values differ between two resolved configs, PROTOCOL_FREE_KEYS (and
    `free_keys`) left out."""
    def free(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in (*PROTOCOL_FREE_KEYS, *free_keys))

    return sorted(key for key, _, _ in config_diff(a, b) if not free(key))


def _folder(summary: dict[str, Any]) -> str:
    return str(Path(summary["_path"]).parent) if summary["_path"].endswith("summary.json") else summary["_path"]


def _num_images(summary: dict[str, Any]) -> int:
    if summary.get("num_images") is not None:
        return int(summary["num_images"])
    counts = [v.get("count") or 0 for m, v in summary["metrics"].items() if m in METRICS]
    return max(counts, default=0)


def _newness(summary: dict[str, Any]) -> float:
    try:
        return Path(summary["_path"]).stat().st_mtime
    except OSError:
        return 0.0


def _pick(key: tuple[str, str], kept: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The run to keep of two for one cell; refuses when their protocols differ."""
    differing = protocol_differences(kept["config"], other["config"])
    if differing:
        raise TableError(
            f"two runs for {key[0]} / {key[1]} differ in {', '.join(differing)}: {_folder(kept)} and "
            f"{_folder(other)}; move one out of the folder or give it another experiment_name"
        )
    winner = max((kept, other), key=lambda s: (_num_images(s), _newness(s), s["_path"]))
    loser = other if winner is kept else kept
    logger.warning("two runs for %s / %s with the same protocol: kept %s (%d images, %s), ignored %s (%d images)",
                   *key, _folder(winner), _num_images(winner),
                   "more images" if _num_images(winner) != _num_images(loser) else "newer",
                   _folder(loser), _num_images(loser))
    return winner


def shard_key(config: dict[str, Any]) -> tuple[int, int]:
    """(shard, num_shards) of a run's config; (0, 1) for a run of a whole cell (or from before shards)."""
    data = config.get("data") or {}
    return int(data.get("shard", 0)), int(data.get("num_shards", 1))


def read_records(folder: str | Path) -> list[dict[str, Any]]:
    """The complete per-image records of a run folder's metrics.jsonl, read only: a partial last line (a run
    killed mid-write) is skipped, not repaired, since make_table never writes into a run folder."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        raise TableError(f"{path.parent} has a summary.json but no metrics.jsonl: shards are merged from their "
                         "per-image records; restore the file or move that folder out")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if line.endswith("\n"):
                records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def merge_shards(key: tuple[str, str], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for the cell `key` from the summaries of its shards (at least one with num_shards > 1).

    The shards must share the protocol (config minus PROTOCOL_FREE_KEYS and the shard keys) and the cell's
    image list, and no image may be in two of them (else TableError naming the keys, or the index and the
    folders). Means and std are over the union of their records; num_expected is the whole cell's size, so
    missing shards or images make a partial cell.
    """
    parts = sorted(parts, key=lambda s: shard_key(s["config"]))
    first = parts[0]
    for other in parts[1:]:
        differing = protocol_differences(first["config"], other["config"], SHARD_CONFIG_KEYS)
        if differing:
            raise TableError(
                f"two shards of {key[0]} / {key[1]} differ in {', '.join(differing)}: {_folder(first)} and "
                f"{_folder(other)}; move one out of the folder or give it another experiment_name"
            )
    sizes = {int(s["shard"]["cell_images"]) for s in parts if s.get("shard")}
    if len(sizes) > 1:
        raise TableError(f"the shards of {key[0]} / {key[1]} split image lists of different sizes {sorted(sizes)} "
                         f"(data.limit or the image folder differ): {', '.join(_folder(s) for s in parts)}")
    owner: dict[int, str] = {}
    records = []
    for s in parts:
        folder = _folder(s)
        for record in read_records(folder):
            if record["index"] in owner:
                raise TableError(
                    f"image {record['index']} of {key[0]} / {key[1]} is in two runs: {owner[record['index']]} and "
                    f"{folder} (shards of different data.num_shards, or a shard run twice); move one out"
                )
            owner[record["index"]] = folder
            records.append(record)
    merged = summarize(records)
    merged.update(num_expected=sizes.pop() if sizes else None, choices=first["choices"], config=first["config"],
                  _path=first["_path"], merged=[_folder(s) for s in parts])
    return merged


def _unfinished_key(run: dict[str, Any]) -> tuple[str, str] | None:
    choices = run["choices"]
    task = choices.get("task") or (run["config"].get("task") or {}).get("name")
    if not task or not (choices.get("solver") or choices.get("method")):
        return None
    summary = {"choices": {"solver": choices.get("solver") or choices.get("method"), **choices},
               "config": run["config"]}
    return method_label(summary), str(task)


def our_table(experiment: str, summaries: list[dict[str, Any]],
              unfinished: list[dict[str, Any]] | None = None) -> Table:
    """The rows we measured for one experiment.

    Two runs of one cell and shard must have the same protocol (config minus PROTOCOL_FREE_KEYS), else
    TableError; of equal ones the run with more finished images, then the newer, is kept. The shards of a
    cell are merged (merge_shards). Unfinished runs (see load_unfinished) of a cell without a finished run
    show as "unfinished" cells.
    """
    shards: dict[tuple[str, str], dict[tuple[int, int], dict[str, Any]]] = {}
    for s in summaries:
        key = (method_label(s), s["choices"].get("task", "?"))
        parts, part = shards.setdefault(key, {}), shard_key(s["config"])
        parts[part] = _pick(key, parts[part], s) if part in parts else s
    best: dict[tuple[str, str], dict[str, Any]] = {}
    merged: dict[str, list[str]] = {}
    for key, parts in shards.items():
        if all(num_shards == 1 for _, num_shards in parts):
            best[key] = next(iter(parts.values()))
            continue
        best[key] = merge_shards(key, list(parts.values()))
        merged[f"{key[0]} / {key[1]}"] = best[key]["merged"]
        logger.info("%s / %s: merged %d shards (%s)", *key, len(parts), ", ".join(best[key]["merged"]))
    rows: dict[str, Row] = {}
    partial = False
    for (label, task), s in best.items():
        row = rows.setdefault(label, Row(label))
        n = _num_images(s)
        expected = s.get("num_expected")
        failed = int(s.get("num_failed") or 0)
        is_partial = expected is not None and n + failed < int(expected)
        partial |= is_partial
        row.cells[task] = {
            m: Cell(v.get("mean"), v.get("std"), v.get("count"), mark="‡" if is_partial else "")
            for m, v in s["metrics"].items() if m in METRICS
        }
        row.failed[task] = failed
        row.images[task] = n
        row.expected[task] = None if expected is None else int(expected)
        row.excluded[task] = {
            m: int(v["excluded"]) if v.get("excluded") is not None else n - int(v.get("count") or 0)
            for m, v in s["metrics"].items()
            if m in METRICS and (v.get("count") != n or v.get("excluded"))
        }
    notes = []
    for run in unfinished or []:
        key = _unfinished_key(run)
        if key is None:
            notes.append(f"Unfinished run (cell unknown) in {run['_path']}: {run['done']} images done.")
            continue
        if key in best:
            shard, num_shards = shard_key(run["config"])
            what = f"shard {shard} of {num_shards}" if num_shards > 1 else "run"
            notes.append(f"Unfinished {what} of {key[0]} / {key[1]} in {run['_path']} ignored: "
                         f"finished runs of that cell are shown ({_folder(best[key])}).")
            continue
        row = rows.setdefault(key[0], Row(key[0]))
        text = f"unfinished ({run['done']} done" + (f", {run['failed']} failed)" if run["failed"] else ")")
        row.unfinished[key[1]] = f"{text}: {run['_path']}"
        row.cells.setdefault(key[1], {})
        notes.append(f"Unfinished: {key[0]} / {key[1]} has no summary.json ({run['_path']}); no numbers shown.")
    if partial:
        notes.insert(0, "‡ partial: fewer images finished or failed than the run was asked for (see Images per "
                        "cell, done/asked).")
    tasks = _order(sorted({task for r in rows.values() for task in r.cells}), TASK_ORDER)
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
        notes=notes,
        merged=merged,
    )


def add_published(table: Table, published: dict[str, Any]) -> None:
    """Append the published rows whose dataset equals the table's and whose task is a column."""
    rows: dict[tuple[str, str], Row] = {}
    used: list[dict[str, Any]] = []  # entries with a note
    mismatched = False
    for e in published["entries"]:
        if e["dataset"] != table.dataset or e["task"] not in table.tasks:
            continue
        if e.get("note"):
            used.append(e)
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
    for source in dict.fromkeys(source for _, source in rows):
        info = published["sources"][source]
        if info.get("note"):
            table.notes.append(f"{info['citation']}: {info['note']}.")
    for e in used:
        table.notes.append(f"{e['method']}, {e['task']} ({published['sources'][e['source']]['citation']}): "
                           f"{e['note']}.")
    if not rows and table.dataset is not None:
        table.notes.append(f"No published numbers for data={table.dataset}.")


def build_tables(summaries: list[dict[str, Any]], published: dict[str, Any] | None = None,
                 unfinished: list[dict[str, Any]] | None = None) -> list[Table]:
    """One Table per experiment_name found in the summaries, with published rows when given.

    `unfinished` (from load_unfinished) puts killed runs in as "unfinished" cells of their experiment.
    """
    by_experiment: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        by_experiment.setdefault(str(s["config"].get("experiment_name", "default")), []).append(s)
    open_runs: dict[str, list[dict[str, Any]]] = {}
    for run in unfinished or []:
        if "experiment_name" not in run["config"]:  # no run_config.json: name it under every table
            for experiment in by_experiment:
                open_runs.setdefault(experiment, []).append(run)
            continue
        experiment = str(run["config"]["experiment_name"])
        if experiment not in by_experiment:
            logger.warning("unfinished run %s: experiment %s has no finished run, so no table", run["_path"],
                           experiment)
            continue
        open_runs.setdefault(experiment, []).append(run)
    tables = []
    for experiment in sorted(by_experiment):
        table = our_table(experiment, by_experiment[experiment], open_runs.get(experiment))
        if published is not None:
            add_published(table, published)
        tables.append(table)
    return tables


def format_cell(cell: Cell | None, metric: str, pm: str = "±") -> str:
    if cell is None or cell.mean is None or not math.isfinite(cell.mean):
        return "–"
    decimals = METRICS[metric][2]
    text = f"{cell.mean:.{decimals}f}"
    if cell.std is not None and (cell.n is None or cell.n > 1):  # no spread to show over one image
        text += f" {pm} {cell.std:.{decimals}f}"
    return text + cell.mark


def _metric_title(metric: str) -> str:
    name, better, _ = METRICS[metric]
    return f"{name} ({better} is better)"


def _images_text(row: Row, task: str) -> str:
    """Finished images ("37/1000" when fewer than asked for), failures, per-metric exclusions."""
    if task in row.unfinished:
        return row.unfinished[task].split(":")[0]
    if task not in row.cells:
        return "–"
    n = row.images.get(task)
    if n is None:  # a Row built by hand: the first metric's count
        cell = next(iter(row.cells[task].values()), None)
        n = (cell.n or 0) if cell is not None else 0
    expected = row.expected.get(task)
    text = f"{n}/{expected}" if expected is not None and n != expected else f"{n}"
    extras = []
    if row.failed.get(task):
        extras.append(f"{row.failed[task]} failed")
    extras += [f"{m}: {k} excluded" for m, k in sorted(row.excluded.get(task, {}).items()) if k]
    return text + (f" ({'; '.join(extras)})" if extras else "")


def _cell_text(row: Row, task: str, metric: str) -> str:
    if task in row.unfinished:
        return "unfinished"
    return format_cell(row.cells.get(task, {}).get(metric), metric)


def to_markdown(table: Table, metrics: list[str]) -> str:
    """One Markdown table per metric (ours, then published rows), one of image counts, then the notes."""
    header = f"| method | {' | '.join(table.tasks)} |\n|---|{'---|' * len(table.tasks)}"
    out = [f"## {table.experiment} (data: {table.dataset}, LPIPS: {table.lpips_net})", ""]
    for metric in metrics:
        rows = [r for r in table.rows if not r.published or any(metric in c for c in r.cells.values())]
        out += [f"### {_metric_title(metric)}", "", header]
        for r in rows:
            label = f"*{r.label}*" if r.published else r.label
            cells = [_cell_text(r, t, metric) for t in table.tasks]
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
                 ("†", r"$^\dagger$"), ("‡", r"$^\ddagger$"), ("—", "---"), ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def to_latex(table: Table, metrics: list[str]) -> str:
    """One booktabs tabular per metric, the published rows below a rule, the notes as footnote rows."""
    width = len(table.tasks) + 1
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
                cells = [_tex(_cell_text(r, t, metric)) for t in table.tasks]
                out.append(_tex(r.label) + " & " + " & ".join(cells) + r" \\")
        out.append(r"\bottomrule")
        out += [rf"\multicolumn{{{width}}}{{p{{\linewidth}}}}{{\footnotesize {_tex(note)}}} \\" for note in table.notes]
        out += [r"\end{tabular}", ""]
    out += [r"\begin{tabular}{l" + "c" * len(table.tasks) + "}", r"\toprule",
            "Images per cell & " + " & ".join(_tex(t) for t in table.tasks) + r" \\", r"\midrule"]
    for r in (r for r in table.rows if not r.published):
        out.append(_tex(r.label) + " & " + " & ".join(_tex(_images_text(r, t)) for t in table.tasks) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", ""]
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
