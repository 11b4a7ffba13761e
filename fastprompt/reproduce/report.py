"""The reproduction's table: our mean ± std over seeds beside the paper's printed numbers.

Built from `fastprompt.sweep.report` (each trained row's folder read as `fastprompt report`
reads a sweep, the recipe check included) and rendered by its renderers, so it reads as
`fastprompt report --compare` does: `MEAN ± STD (n=N) [ref PAPER, +DIFF]`. Rows are the
paper's labels ("VLP-CLIP-CAVPT"), columns its headers ("Oxford Flowers"); a row whose method
is not available, or that has no finished run yet, shows the paper's numbers marked `(no runs)`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fastprompt.errors import FastpromptError
from fastprompt.reproduce.plan import Plan, RowStep
from fastprompt.reproduce.tables import AVERAGE, PaperTable, Row
from fastprompt.sweep.report import RENDERERS, Stat, Table

FORMATS = {"md": "report.md", "csv": "report.csv", "latex": "report.tex"}


def _label(row: Row) -> str:
    return row.label if row.available else f"{row.label} [{row.method}: not available]"


def _heads(table: PaperTable, dataset: str) -> dict:
    """{metric: the printed column of `dataset`} as `report` heads them."""
    col = table.columns[dataset]
    return {m: col if m == "acc" else f"{col} {m}" for m in table.metrics}


def _trained_cells(table: PaperTable, step: RowStep) -> dict:
    """{(column, metric): Stat} of a trained row, from its sweep folder (none yet: {})."""
    from fastprompt.sweep.report import build_tables

    if not any(step.folder.rglob("results.json")):
        return {}
    built = build_tables(step.folder, "method", "dataset")
    cells = {}
    for t in built:
        for (r, dataset, metric), stat in t.cells.items():
            if dataset in table.columns:
                cells[(table.columns[dataset], metric)] = stat
    return cells


def _zeroshot_cells(table: PaperTable, step: RowStep) -> dict:
    from fastprompt.training.runfiles import harmonic_mean

    values: dict = {}
    for dataset, _seed, path in step.zeroshot:
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise FastpromptError(f"{path} is unreadable ({err}); delete it, the next run evaluates it again") from None
            for metric, value in record["accuracy"].items():
                values.setdefault((table.columns[dataset], metric), []).append(value)
    cells = {key: Stat(statistics.fmean(v), statistics.pstdev(v), len(v)) for key, v in values.items()}
    if table.classes != "all":
        for col in {c for c, _ in cells}:
            b, n = cells.get((col, "base")), cells.get((col, "new"))
            if b is not None and n is not None:
                cells[(col, "H")] = Stat(harmonic_mean(b.mean, n.mean), None, min(b.n, n.n))
    return cells


def build_table(plan: Plan) -> Table:
    """One report table of every row of the paper's table, with the printed numbers as reference."""
    from fastprompt.training.runfiles import harmonic_mean

    t = plan.table
    cols = [t.columns[d] for d in t.datasets]
    labels, cells, no_runs = [], {}, []
    steps = {s.row.label: s for s in plan.rows}
    for row in t.rows:
        label = _label(row)
        labels.append(label)
        step = steps.get(row.label)
        found = {} if step is None else (_trained_cells(t, step) if row.trains else _zeroshot_cells(t, step))
        if not found:
            no_runs.append(label)
        for (col, metric), stat in found.items():
            cells[(label, col, "acc" if t.classes == "all" else metric)] = stat
    metrics = t.metrics
    table = Table(keys={"table": t.name, "shots": str(t.shots), "classes": t.classes}, rows_axis="method",
                  cols_axis="dataset", rows=labels, cols=cols, metrics=metrics, cells=cells, average={},
                  no_runs=no_runs)
    for label in labels:
        for metric in ("acc", "base", "new"):
            if metric in metrics:
                stats = [cells.get((label, c, metric)) for c in cols]
                table.average[(label, metric)] = (None if any(s is None for s in stats)
                                                  else statistics.fmean(s.mean for s in stats))
        if t.classes != "all":
            b, n = table.average[(label, "base")], table.average[(label, "new")]
            table.average[(label, "H")] = None if b is None or n is None else harmonic_mean(b, n)
    average_heads = dict(table.average_labels())
    for row in t.rows:
        for key, value in row.numbers.items():
            values = dict(zip(metrics, value if isinstance(value, list) else [value]))
            for metric, number in values.items():
                head = average_heads[metric] if key == AVERAGE else _heads(t, key)[metric]
                table.reference[(_label(row), head)] = number
    return table


def render(plan: Plan, fmt: str) -> str:
    """The table in `fmt` (md, csv, latex, json), with a line naming the source."""
    text = RENDERERS[fmt]([build_table(plan)])
    s = plan.table.source
    source = f"{s.paper}, {s.table}; {s.setting}. Paper numbers as printed (read from {s.read_from})"
    if fmt == "md":
        return f"**{plan.table.name}**: {plan.table.title}\n\n" + text + f"\n_ref: {source}._\n"
    if fmt == "latex":
        return f"% {plan.table.name}: {source}\n" + text
    return text


def write_reports(plan: Plan) -> list[Path]:
    """OUT/report.md, report.csv, report.tex (each written whole, atomically)."""
    from fastprompt.files import write_text

    written = []
    for fmt, name in FORMATS.items():
        path = plan.out / name
        write_text(path, render(plan, fmt))
        written.append(path)
    return written
