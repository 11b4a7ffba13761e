"""Paper tables from a folder of runs: `fastprompt report DIR`.

Every `results.json` under the folder is a run (its `config.json` beside it); its
`eval-DATASET-all.json` files are its cross-dataset evaluations. Runs are grouped by
everything but the seed and printed as mean ± std (n) per cell, with an Average column:
- accuracy: the mean of the row's cells;
- base-to-new (`classes` base): base / new / H per dataset, where H is the harmonic mean of
  the mean base and mean new accuracy, and the Average's H that of the averages (as CoCoOp's
  tables);
- cross-dataset: one table per source dataset, the source column first, then the targets;
  the Average is over the targets (CoCoOp Table 2).
`--metric per-class-acc` puts each run's mean per-class accuracy (results.json's
`mean_per_class_accuracy`, base's and new's for base-to-new) in place of the accuracy, with the same
layout, means and H. The std is numpy's default (population, ddof=0), as Dassl's `tools/parse_test_res.py`
(`np.std(res)`), which CoOp and CoCoOp report. One report shows one recipe: runs that differ in
anything but the seed and what the axes set (`fastprompt.training.identity.recipe_difference`:
each dataset's file, classes and template, each method's options, and what the protocol or the
defaults resolve per dataset and shots, such as ImageNet's 50 epochs) are refused with the field,
both values and both runs named; seeds missing against the grid (`sweep.json`, else every seed
found) are shown.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.validation import check_choice, is_number, json_type, require

AXES = ("method", "dataset", "shots")  # what --rows / --cols may name
SPLIT_AXES = ("method", "dataset", "shots", "classes", "source")  # one table per value of those not on rows/cols
FORMATS = ("md", "csv", "json", "latex")
# --metric: the accuracy every cell holds, and the results.json / eval-*.json key it reads (base-to-new: `base_` and
# `new_` before it, but for acc: base_accuracy, new_accuracy); per-class-acc is Dassl's TEST.PER_CLASS_RESULT average
METRICS = {"acc": "test_accuracy", "per-class-acc": "mean_per_class_accuracy"}
B2N_METRICS = ("base", "new", "H")


@dataclass
class Measurement:
    run: str  # the run's folder
    method: str
    dataset: str  # evaluated on
    source: str  # trained on (== dataset except for cross-dataset evaluations)
    shots: str  # "16", or "all"
    classes: str  # "all" or "base" (base-to-new)
    seed: int
    metrics: dict  # {"acc": x} or {"base": x, "new": y}


@dataclass
class Stat:
    mean: float
    std: Optional[float]  # None for H (a function of two means)
    n: int
    missing: list = field(default_factory=list)  # seeds of the grid without a run


@dataclass
class Table:
    keys: dict  # values of the split axes, e.g. {"shots": "16", "classes": "all"}
    rows_axis: str
    cols_axis: str
    rows: list[str]
    cols: list[str]
    metrics: tuple[str, ...]  # ("acc",) or B2N_METRICS
    cells: dict  # (row, col, metric) -> Stat; absent: no run at all
    average: dict  # (row, metric) -> float or None (a cell missing)
    targets: list[str] = field(default_factory=list)  # cross-dataset: the target columns (the others are the source)
    reference: dict = field(default_factory=dict)  # (row, label) -> number from --compare
    measure: str = "acc"  # --metric: what every cell averages (`METRICS`)

    def labels(self) -> list[tuple[str, str, str]]:
        """(column, metric, header) of every printed column but the row label and the Average."""
        out = []
        for col in self.cols:
            for metric in self.metrics:
                head = col if metric == "acc" else f"{col} {metric}"
                if self.targets and col not in self.targets and self.cols_axis == "dataset":
                    head += " (source)"
                out.append((col, metric, head))
        return out

    def average_labels(self) -> list[tuple[str, str]]:
        name = "Average (targets)" if self.targets else "Average"
        return [(m, name if m == "acc" else f"{name} {m}") for m in self.metrics]


# ------------------------------------------------------------------------------ reading runs
def _read_json(path: Path, fix: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FastpromptError(f"{path} is unreadable ({err}); {fix}") from None


def _is_count(v, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


# what report reads from each file, and what it must be: (description, test)
_TEXT = ("a string", lambda v: isinstance(v, str) and v != "")
_ACCURACY = ("a number in 0..100", lambda v: is_number(v) and 0 <= v <= 100)
RESULTS_FIELDS = {
    "method": _TEXT, "dataset": _TEXT,
    "shots": ("an integer >= 1, or null (every image)", lambda v: v is None or _is_count(v, 1)),
    "classes": ("'all' or 'base'", lambda v: v in ("all", "base")),
    "seed": ("an integer >= 0", lambda v: _is_count(v, 0)),
}
RESULTS_METRICS = {"all": ("test_accuracy",), "base": ("base_accuracy", "new_accuracy")}


def _metric_keys(metric: str, classes: str) -> tuple[str, ...]:
    """The results.json keys of `metric` for a run on `classes` (all: one; base: base's and new's)."""
    if metric == "acc":
        return RESULTS_METRICS[classes]
    return (METRICS[metric],) if classes == "all" else (f"base_{METRICS[metric]}", f"new_{METRICS[metric]}")
EVAL_FIELDS = {"dataset": _TEXT, "test_accuracy": _ACCURACY}
GRID_FIELDS = {  # sweep.json's "grid" (each key optional: the report orders by them and counts missing seeds)
    "datasets": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "methods": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "shots": ("a list of integers or nulls", lambda v: isinstance(v, list) and all(x is None or _is_count(x, 1) for x in v)),
    "seeds": ("a list of integers >= 0", lambda v: isinstance(v, list) and all(_is_count(x, 0) for x in v)),
}


def _checked(path: Path, value, fields: dict, fix: str, required: bool = True, within: str = "") -> dict:
    """`value` (the JSON of `path`, or its member `within`) if it is an object whose `fields` are
    what they must be (NaN and inf are not numbers here); else FastpromptError naming the file,
    the field and `fix`."""
    if not isinstance(value, dict):
        where = f"{path}: {within.rstrip('.')} is" if within else f"{path} holds"
        raise FastpromptError(f"{where} a JSON {json_type(value)}, not an object; {fix}")
    for name, (what, ok) in fields.items():
        if name not in value:
            if required:
                raise FastpromptError(f"{path} lacks {within}{name}; {fix}")
        elif not ok(value[name]):
            raise FastpromptError(f"{path}: {within}{name}={value[name]!r} must be {what}; {fix}")
    return value


def read_results(path: Path, metric: str = "acc") -> dict:
    """A finished run's results.json, checked: method, dataset, shots, classes, seed and the
    accuracies of its classes (finite numbers in 0..100) that `metric` reads."""
    fix = "delete it and train that run again (a sweep reruns the cell: `fastprompt sweep` with its --out)"
    results = _checked(path, _read_json(path, fix), RESULTS_FIELDS, fix)
    results = _checked(path, results, {m: _ACCURACY for m in RESULTS_METRICS[results["classes"]]}, fix)
    keys = _metric_keys(metric, results["classes"])
    lacking = [k for k in keys if k not in results]
    if lacking:
        raise FastpromptError(f"{path} lacks {', '.join(lacking)} (written before fastprompt kept per-class results); "
                              f"evaluate that run again (its train command with --force-eval), or report --metric acc")
    return _checked(path, results, {m: _ACCURACY for m in keys}, fix)


def load_runs(root: Path, metric: str = "acc") -> tuple[list[Measurement], dict]:
    """Every measurement of `metric` under `root` and each run's config (by run folder)."""
    from fastprompt.training.runfiles import read_run_config

    if not root.is_dir():
        raise FastpromptError(f"{root} is not a folder; pass the --out of a sweep or a folder of runs")
    measurements, configs = [], {}
    for results_path in sorted(root.rglob("results.json")):
        run = results_path.parent
        if not (run / "config.json").is_file():
            raise FastpromptError(f"{run} has results.json but no config.json; it is not a fastprompt run, move it out of {root}")
        results = read_results(results_path, metric)
        configs[str(run)] = read_run_config(run, needed=("method", "data"))
        shots = "all" if results["shots"] is None else str(results["shots"])
        common = dict(run=str(run), method=results["method"], shots=shots, classes=results["classes"],
                      seed=results["seed"], source=results["dataset"])
        values = [results[k] for k in _metric_keys(metric, results["classes"])]
        metrics = dict(zip(("base", "new"), values)) if results["classes"] == "base" else {"acc": values[0]}
        measurements.append(Measurement(dataset=results["dataset"], metrics=metrics, **common))
        for eval_path in sorted(run.glob("eval-*-all.json")):
            fix = f"delete it and evaluate again (`fastprompt eval {run} --data ...`; a sweep does it for its --eval-on)"
            ev = _checked(eval_path, _read_json(eval_path, fix), EVAL_FIELDS, fix)
            if ev["dataset"] == results["dataset"]:
                continue  # the source's own test split: already results.json
            if METRICS[metric] not in ev:
                raise FastpromptError(f"{eval_path} lacks {METRICS[metric]} (written before fastprompt kept per-class "
                                      f"results); {fix}, or report --metric acc")
            ev = _checked(eval_path, ev, {METRICS[metric]: _ACCURACY}, fix)
            # a target is scored on all its classes, whatever the source trained on (base-to-new too)
            measurements.append(Measurement(dataset=ev["dataset"], metrics={"acc": ev[METRICS[metric]]},
                                            **{**common, "classes": "all"}))
    if not measurements:
        raise FastpromptError(f"no results.json under {root}; run `fastprompt sweep --out {root}` (or train) first")
    return measurements, configs


def _grid(root: Path) -> dict:
    path = root / "sweep.json"
    if not path.is_file():
        return {}
    fix = "delete it (the report then takes the seeds it finds) or run the sweep again to rewrite it"
    record = _checked(path, _read_json(path, fix), {"grid": ("an object", lambda v: isinstance(v, dict))}, fix,
                      required=False)
    return _checked(path, record.get("grid", {}), GRID_FIELDS, fix, required=False, within="grid.")


def check_one_recipe(measurements: list[Measurement], configs: dict) -> None:
    """FastpromptError naming the field, both values and both runs if the runs under one report
    differ in more than the seed and what the table's axes set (`identity.recipe_difference`:
    the dataset's file, classes and template, each method's options and groups, epochs and group
    recipes as the protocol or the defaults resolve them per dataset and shots)."""
    from fastprompt.training.identity import recipe_difference

    runs = {m.run: (m.run, {"method": m.method, "dataset": m.source, "shots": m.shots, "classes": m.classes},
                    configs[m.run]) for m in measurements if m.dataset == m.source}
    diff = recipe_difference(list(runs.values()))
    if diff is not None:
        name, a, b, va, vb = diff
        raise FastpromptError(
            f"runs {a} and {b} differ in {name} ({va!r} vs {vb!r}): one report holds one recipe, its runs may differ only "
            "in the seed and in what the method, dataset, shots and classes set (data, class names, and the template, "
            "epochs, group lr and warm-up and method options the protocol or the defaults resolve there); "
            "report them from separate folders"
        )


# ------------------------------------------------------------------------------ tables
def _natural(v) -> tuple:
    v = str(v)
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def _order(values, preferred: list) -> list[str]:
    """`values` in the grid's order (`preferred`), the others after them in natural order."""
    values = set(values)
    known = [str(v) for v in preferred if str(v) in values]
    return known + sorted((v for v in values if v not in known), key=_natural)


def _stat(values: list[float], missing: list) -> Stat:
    return Stat(mean=statistics.fmean(values), std=statistics.pstdev(values), n=len(values), missing=missing)


def build_tables(root, rows: str = "method", cols: str = "dataset", metric: str = "acc") -> list[Table]:
    """The tables of `metric` (`METRICS`) of the runs under `root`: one per value of the axes not on rows or cols."""
    from fastprompt.training.runfiles import harmonic_mean

    root = Path(root)
    check_choice("rows", rows, AXES)
    check_choice("cols", cols, AXES)
    require(rows != cols, f"rows and cols are both {rows!r}; pick two different axes of {', '.join(AXES)}")
    check_choice("metric", metric, METRICS)
    measure = metric  # (`metric` below names a table's columns: acc, base, new, H)
    measurements, configs = load_runs(root, measure)
    check_one_recipe(measurements, configs)
    grid = _grid(root)
    expected_seeds = sorted(set(grid.get("seeds", [])) or {m.seed for m in measurements})
    preferred = {"method": grid.get("methods", []), "dataset": grid.get("datasets", []),
                 "shots": ["all" if s is None else s for s in grid.get("shots", [])]}
    cross = any(m.dataset != m.source for m in measurements)
    split = [a for a in SPLIT_AXES if a not in (rows, cols) and (a != "source" or cross)]

    groups: dict = {}
    for m in measurements:
        groups.setdefault(tuple(getattr(m, a) for a in split), []).append(m)
    tables = []
    for key in sorted(groups, key=lambda k: tuple(_natural(v) for v in k)):
        ms = groups[key]
        keys = dict(zip(split, key))
        classes = keys.get("classes", ms[0].classes)
        metrics = B2N_METRICS if classes == "base" else ("acc",)
        row_labels = _order({getattr(m, rows) for m in ms}, preferred.get(rows, []))
        col_labels = _order({getattr(m, cols) for m in ms}, preferred.get(cols, []))
        targets = []
        if cross and cols == "dataset":
            source = keys.get("source")
            col_labels = [c for c in col_labels if c == source] + [c for c in col_labels if c != source]
            targets = [c for c in col_labels if c != source]
        by_cell: dict = {}
        for m in ms:
            by_cell.setdefault((getattr(m, rows), getattr(m, cols)), []).append(m)
        cells: dict = {}
        for (r, c), runs in by_cell.items():
            seeds = sorted(m.seed for m in runs)
            require(len(set(seeds)) == len(seeds),
                    f"cell {rows}={r}, {cols}={c} of {keys} has seed(s) twice ({', '.join(m.run for m in runs)}); "
                    "report them from separate folders")
            missing = [s for s in expected_seeds if s not in seeds]
            if metrics == ("acc",):
                cells[(r, c, "acc")] = _stat([m.metrics["acc"] for m in runs], missing)
            else:
                base = _stat([m.metrics["base"] for m in runs], missing)
                new = _stat([m.metrics["new"] for m in runs], missing)
                cells[(r, c, "base")], cells[(r, c, "new")] = base, new
                cells[(r, c, "H")] = Stat(harmonic_mean(base.mean, new.mean), None, min(base.n, new.n), missing)
        average = {}
        averaged = targets or col_labels
        for r in row_labels:
            for metric in ("acc", "base", "new"):
                if metric in metrics:
                    stats = [cells.get((r, c, metric)) for c in averaged]
                    average[(r, metric)] = (None if any(s is None for s in stats)
                                            else statistics.fmean(s.mean for s in stats))
            if metrics == B2N_METRICS:
                b, n = average[(r, "base")], average[(r, "new")]
                average[(r, "H")] = None if b is None or n is None else harmonic_mean(b, n)
        tables.append(Table(keys, rows, cols, row_labels, col_labels, metrics, cells, average, targets, measure=measure))
    return tables


# ------------------------------------------------------------------------------ --compare
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def load_reference(other, rows: str, cols: str, metric: str = "acc") -> list[tuple[dict, dict]]:
    """A reference table: another folder of runs, or a CSV (a paper table typed in: a column named
    as the rows axis holding row labels, optional key columns such as shots, and one column per
    printed header, e.g. `method,eurosat,dtd,Average`); as (keys, {(row, header): number})."""
    path = Path(other)
    if path.is_dir():
        return [(t.keys, _table_means(t)) for t in build_tables(path, rows, cols, metric)]
    if not path.is_file():
        raise FastpromptError(f"--compare {other} is neither a folder of runs nor a CSV file; check the path")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        require(rows in header, f"--compare {other}: the CSV needs a '{rows}' column with the row labels (its header: {','.join(header)})")
        key_cols = [h for h in header if h in SPLIT_AXES and h not in (rows, cols)]
        value_cols = [h for h in header if h != rows and h not in key_cols and not h.endswith((" std", " n"))]
        out: dict = {}
        for line in reader:
            keys = tuple((k, str(line[k]).strip()) for k in key_cols)
            for h in value_cols:
                match = _NUMBER.search(line.get(h) or "")
                if match:
                    out.setdefault(keys, {})[(str(line[rows]).strip(), h)] = float(match.group())
    return [(dict(k), v) for k, v in out.items()]


def _table_means(table: Table) -> dict:
    means = {}
    for r in table.rows:
        for col, metric, head in table.labels():
            stat = table.cells.get((r, col, metric))
            if stat is not None:
                means[(r, head)] = stat.mean
        for metric, head in table.average_labels():
            if table.average.get((r, metric)) is not None:
                means[(r, head)] = table.average[(r, metric)]
    return means


def attach_reference(tables: list[Table], reference: list[tuple[dict, dict]]) -> None:
    """Give each table the reference numbers whose keys it matches (a key the reference lacks matches all)."""
    for table in tables:
        for keys, values in reference:
            if all(str(table.keys.get(k)) == v for k, v in keys.items() if k in table.keys):
                table.reference.update(values)


# ------------------------------------------------------------------------------ rendering
def _cell_text(stat: Optional[Stat], latex: bool = False) -> str:
    if stat is None:
        return "missing"
    pm = "$\\pm$" if latex else "±"
    text = f"{stat.mean:.2f}" if stat.std is None else f"{stat.mean:.2f} {pm} {stat.std:.2f}"
    note = f"n={stat.n}"
    if stat.missing:
        note += f"; seed{'s' if len(stat.missing) > 1 else ''} {', '.join(map(str, stat.missing))} missing"
    return f"{text} ({note})"


def _with_ref(text: str, mean: Optional[float], ref: Optional[float]) -> str:
    if ref is None:
        return text
    diff = "" if mean is None else f", {mean - ref:+.2f}"
    return f"{text} [ref {ref:.2f}{diff}]"


def _grid_rows(table: Table, latex: bool = False) -> tuple[list[str], list[list[str]]]:
    labels, avg_labels = table.labels(), table.average_labels()
    header = [table.rows_axis] + [h for _, _, h in labels] + [h for _, h in avg_labels]
    body = []
    for r in table.rows:
        line = [r]
        for col, metric, head in labels:
            stat = table.cells.get((r, col, metric))
            line.append(_with_ref(_cell_text(stat, latex), None if stat is None else stat.mean, table.reference.get((r, head))))
        for metric, head in avg_labels:
            value = table.average.get((r, metric))
            line.append(_with_ref("—" if value is None else f"{value:.2f}", value, table.reference.get((r, head))))
        body.append(line)
    return header, body


def _title(table: Table) -> str:
    title = ", ".join(f"{k}={v}" for k, v in table.keys.items())
    return title if table.measure == "acc" else f"{title}; mean per-class accuracy"


def to_markdown(tables: list[Table]) -> str:
    parts = []
    for table in tables:
        header, body = _grid_rows(table)
        lines = [f"**{_title(table)}**", ""] if table.keys else []
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in body]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _latex_escape(text: str) -> str:
    return re.sub(r"([_%&#])", r"\\\1", text)


def to_latex(tables: list[Table]) -> str:
    parts = []
    for table in tables:
        header, body = _grid_rows(table, latex=True)
        lines = [f"% {_title(table)}"] if table.keys else []
        lines += ["\\begin{tabular}{l" + "c" * (len(header) - 1) + "}", "\\toprule",
                  " & ".join(_latex_escape(h) for h in header) + " \\\\", "\\midrule"]
        lines += [" & ".join(_latex_escape(c) if i == 0 else c for i, c in enumerate(row)) + " \\\\" for row in body]
        lines += ["\\bottomrule", "\\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_csv(tables: list[Table]) -> str:
    """One line per table row: the split keys, the row label, then for each column its mean,
    std and n (`HEAD`, `HEAD std`, `HEAD n`), the Average, and `HEAD ref` with --compare."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    last_header = None
    for table in tables:
        keys = list(table.keys)
        header = keys + [table.rows_axis]
        for _, _, head in table.labels():
            header += [head, f"{head} std", f"{head} n"] + ([f"{head} ref"] if table.reference else [])
        header += [h for _, h in table.average_labels()]
        if header != last_header:
            writer.writerow(header)
            last_header = header
        for r in table.rows:
            line = [table.keys[k] for k in keys] + [r]
            for col, metric, head in table.labels():
                stat = table.cells.get((r, col, metric))
                line += ["" if stat is None else f"{stat.mean:.4f}", "" if stat is None or stat.std is None else f"{stat.std:.4f}",
                         "" if stat is None else stat.n]
                if table.reference:
                    ref = table.reference.get((r, head))
                    line.append("" if ref is None else f"{ref:.4f}")
            line += ["" if table.average.get((r, m)) is None else f"{table.average[(r, m)]:.4f}" for m, _ in table.average_labels()]
            writer.writerow(line)
    return buf.getvalue()


def to_json(tables: list[Table]) -> str:
    out = []
    for table in tables:
        cells = []
        for r in table.rows:
            for col, metric, head in table.labels():
                stat = table.cells.get((r, col, metric))
                entry = {table.rows_axis: r, table.cols_axis: col, "metric": metric}
                entry.update({"mean": None, "std": None, "n": 0, "missing_seeds": None} if stat is None else
                             {"mean": stat.mean, "std": stat.std, "n": stat.n, "missing_seeds": stat.missing})
                if table.reference:
                    entry["reference"] = table.reference.get((r, head))
                cells.append(entry)
        average = [{table.rows_axis: r, "metric": m, "mean": table.average.get((r, m))}
                   for r in table.rows for m, _ in table.average_labels()]
        out.append({"keys": table.keys, "rows": table.rows_axis, "cols": table.cols_axis, "targets": table.targets,
                    "cells": cells, "average": average})
    return json.dumps(out, indent=2) + "\n"


RENDERERS = {"md": to_markdown, "csv": to_csv, "json": to_json, "latex": to_latex}


def report(root, fmt: str = "md", rows: str = "method", cols: str = "dataset", compare: Optional[str] = None,
           metric: str = "acc") -> str:
    """The report of `metric` (acc, per-class-acc) of the runs under `root` in format `fmt` (md, csv, json, latex)."""
    check_choice("format", fmt, FORMATS)
    tables = build_tables(root, rows, cols, metric)
    if compare is not None:
        attach_reference(tables, load_reference(compare, rows, cols, metric))
    return RENDERERS[fmt](tables)
