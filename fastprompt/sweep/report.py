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
The ± is the population standard deviation (ddof=0, `statistics.pstdev`), as Dassl's
`tools/parse_test_res.py` (`np.std(res)`), which CoOp and CoCoOp report; every format says so.
With `ci` (e.g. 95) it is instead the half-width of that confidence interval of the mean over
seeds from Student's t with n - 1 degrees of freedom and the sample std (ddof=1); Dassl's
`--ci95` is the normal approximation 1.96 * pstd / sqrt(n), narrower for few seeds.
One report shows one recipe: runs that differ in anything but the seed and what the axes set
(`fastprompt.training.identity.recipe_difference`: each dataset's file, classes and template,
each method's options, and what the protocol or the defaults resolve per dataset and shots, such
as ImageNet's 50 epochs) are refused with the field, both values and both runs named, and for a
method option the fix `--rows ...,OPTION`: rows may name method options after their axis
(`method,cavpt.variant`), one row per value (`cavpt (variant=released)`). Seeds missing against
the grid (`sweep.json`, else every seed found) are shown; rows of a `--compare` reference without
runs here are shown, marked `(no runs)`.
`--metric per-class-acc` puts each run's mean per-class accuracy (results.json's
`mean_per_class_accuracy`, base's and new's for base-to-new) in place of the accuracy, with the same
layout, means and H.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.validation import check_choice, is_number, json_type, require

AXES = ("method", "dataset", "shots")  # what --cols may name, and --rows first (then method options)
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
    options: dict = field(default_factory=dict)  # the run's method options, resolved (`identity`)


@dataclass(frozen=True)
class Rows:
    """What a table's rows are: an axis, then method options that split its values
    (`--rows method,cavpt.variant`: a row per method and, for cavpt, per variant)."""

    axis: str  # one of AXES
    options: tuple[str, ...] = ()  # option fields (create_model keywords), e.g. ("variant",)
    names: tuple[str, ...] = ()  # the same as typed on the command line, e.g. ("cavpt.variant",)

    @property
    def text(self) -> str:
        return ",".join((self.axis, *self.names))

    def label(self, m: Measurement) -> str:
        """The row of `m`: its axis value, with the named options its method has (`cavpt (variant=released)`)."""
        value = str(getattr(m, self.axis))
        named = [f"{name}={m.options[name]}" for name in self.options if name in m.options]
        return f"{value} ({', '.join(named)})" if named else value


def parse_rows(text: str) -> Rows:
    """`method`, or an axis followed by method options as their flags name them without the
    dashes (`method,cavpt.variant`); FastpromptError naming the bad part and the fix."""
    from fastprompt.methods.registry import option_flags

    parts = [p.strip() for p in str(text).split(",")]
    require(parts[0] in AXES, f"rows={text!r} must start with one of {', '.join(AXES)}, optionally followed by "
                              "method options (e.g. method,cavpt.variant)")
    flags = {fl.flag[2:]: fl for fl in option_flags()}  # "cavpt.variant" -> its OptionFlag
    fields, names = [], []
    for part in parts[1:]:
        fl = flags.get(part.replace("_", "-"))
        require(fl is not None, f"rows={text!r}: {part!r} is not a method option; name one as its flag without the "
                                f"dashes, e.g. method,cavpt.variant (the options: `fastprompt train --help`)")
        require(fl.field not in fields, f"rows={text!r} names {part!r} twice; name each option once")
        fields.append(fl.field)
        names.append(fl.flag[2:])
    return Rows(parts[0], tuple(fields), tuple(names))


@dataclass
class Stat:
    mean: float
    std: Optional[float]  # population std (ddof=0); None for H (a function of two means)
    n: int
    missing: list = field(default_factory=list)  # seeds of the grid without a run
    ci: Optional[float] = None  # half-width of the confidence interval of the mean (with --ci; None for n < 2 and H)


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
    row_options: tuple[str, ...] = ()  # the method options that split the rows, as named (`cavpt.variant`)
    ci: Optional[float] = None  # the confidence level (%) of the ± (None: the ± is the population std)
    no_runs: list[str] = field(default_factory=list)  # rows of the --compare reference without a run here
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
    from fastprompt.training.identity import identity
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
        options = identity({"method": results["method"], "options": configs[str(run)].get("options") or {}})["options"]
        common = dict(run=str(run), method=results["method"], shots=shots, classes=results["classes"],
                      seed=results["seed"], source=results["dataset"], options=options)
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


def check_one_recipe(measurements: list[Measurement], configs: dict, rows: Rows = Rows("method")) -> None:
    """FastpromptError naming the field, both values and both runs if the runs under one report
    differ in more than the seed and what the table's axes set (`identity.recipe_difference`:
    the dataset's file, classes and template, each method's options and groups, epochs and group
    recipes as the protocol or the defaults resolve them per dataset and shots); the method
    options `rows` names are axes too. A method option's difference names `--rows ...,OPTION`."""
    from fastprompt.methods.registry import option_flags
    from fastprompt.training.identity import recipe_difference

    runs = {m.run: (m.run, {"method": m.method, "dataset": m.source, "shots": m.shots, "classes": m.classes},
                    configs[m.run]) for m in measurements if m.dataset == m.source}
    diff = recipe_difference(list(runs.values()), axes_options=rows.options)
    if diff is not None:
        name, a, b, va, vb = diff
        fix = "report them from separate folders"
        option = name.split(".", 1)[1] if name.startswith("options.") else None
        flag = next((fl.flag[2:] for fl in option_flags() if fl.field == option), None)
        if flag is not None:
            fix += f", or give each value its own row: --rows {rows.text},{flag}"
        raise FastpromptError(
            f"runs {a} and {b} differ in {name} ({va!r} vs {vb!r}): one report holds one recipe, its runs may differ only "
            "in the seed and in what the method, dataset, shots and classes set (data, class names, and the template, "
            "epochs, group lr and warm-up and method options the protocol or the defaults resolve there) and in the "
            f"method options --rows names; {fix}"
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


def _stat(values: list[float], missing: list, ci: Optional[float] = None) -> Stat:
    n = len(values)
    half = None
    if ci is not None and n >= 2:  # Student's t with n - 1 degrees of freedom, the sample std
        half = t_quantile(0.5 + ci / 200, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Stat(mean=statistics.fmean(values), std=statistics.pstdev(values), n=n, missing=missing, ci=half)


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (its continued fraction, modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    tiny = 1e-300
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * h


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 <= p < 1) of Student's t with `df` degrees of freedom, by bisection on
    its CDF: P(T <= t) = 1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 for t >= 0."""
    cdf = lambda t: 1.0 - 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def build_tables(root, rows="method", cols: str = "dataset", ci: Optional[float] = None,
                 metric: str = "acc") -> list[Table]:
    """The tables of `metric` (`METRICS`) of the runs under `root`: one per value of the axes not on
    rows or cols. `rows`:
    an axis, optionally followed by method options (`method,cavpt.variant`; see `parse_rows`);
    `ci`: a confidence level in percent for the ± (None: the population std)."""
    from fastprompt.training.runfiles import harmonic_mean

    root = Path(root)
    spec = rows if isinstance(rows, Rows) else parse_rows(rows)
    check_choice("cols", cols, AXES)
    require(spec.axis != cols, f"rows and cols are both {cols!r}; pick two different axes of {', '.join(AXES)}")
    require(ci is None or (is_number(ci) and 0 < ci < 100),
            f"ci={ci!r} must be a confidence level in percent between 0 and 100, e.g. 95")
    check_choice("metric", metric, METRICS)
    measure = metric  # (`metric` below names a table's columns: acc, base, new, H)
    measurements, configs = load_runs(root, measure)
    check_one_recipe(measurements, configs, spec)
    grid = _grid(root)
    expected_seeds = sorted(set(grid.get("seeds", [])) or {m.seed for m in measurements})
    preferred = {"method": grid.get("methods", []), "dataset": grid.get("datasets", []),
                 "shots": ["all" if s is None else s for s in grid.get("shots", [])]}
    cross = any(m.dataset != m.source for m in measurements)
    split = [a for a in SPLIT_AXES if a not in (spec.axis, cols) and (a != "source" or cross)]

    groups: dict = {}
    for m in measurements:
        groups.setdefault(tuple(getattr(m, a) for a in split), []).append(m)
    tables = []
    for key in sorted(groups, key=lambda k: tuple(_natural(v) for v in k)):
        ms = groups[key]
        keys = dict(zip(split, key))
        classes = keys.get("classes", ms[0].classes)
        metrics = B2N_METRICS if classes == "base" else ("acc",)
        axis_order = _order({getattr(m, spec.axis) for m in ms}, preferred.get(spec.axis, []))
        axis_of = {spec.label(m): str(getattr(m, spec.axis)) for m in ms}
        row_labels = sorted(axis_of, key=lambda r: (axis_order.index(axis_of[r]), _natural(r)))
        col_labels = _order({getattr(m, cols) for m in ms}, preferred.get(cols, []))
        targets = []
        if cross and cols == "dataset":
            source = keys.get("source")
            col_labels = [c for c in col_labels if c == source] + [c for c in col_labels if c != source]
            targets = [c for c in col_labels if c != source]
        by_cell: dict = {}
        for m in ms:
            by_cell.setdefault((spec.label(m), getattr(m, cols)), []).append(m)
        cells: dict = {}
        for (r, c), runs in by_cell.items():
            seeds = sorted(m.seed for m in runs)
            require(len(set(seeds)) == len(seeds),
                    f"cell {spec.axis}={r}, {cols}={c} of {keys} has seed(s) twice ({', '.join(m.run for m in runs)}); "
                    "report them from separate folders")
            missing = [s for s in expected_seeds if s not in seeds]
            if metrics == ("acc",):
                cells[(r, c, "acc")] = _stat([m.metrics["acc"] for m in runs], missing, ci)
            else:
                base = _stat([m.metrics["base"] for m in runs], missing, ci)
                new = _stat([m.metrics["new"] for m in runs], missing, ci)
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
        tables.append(Table(keys, spec.axis, cols, row_labels, col_labels, metrics, cells, average, targets,
                            row_options=spec.names, ci=ci, measure=measure))
    return tables


# ------------------------------------------------------------------------------ --compare
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_NOT_A_MEAN = re.compile(r" (std|n|ref|ci[\d.]+)$")  # our CSV's columns beside each mean


def load_reference(other, rows, cols: str, metric: str = "acc") -> list[tuple[dict, dict]]:
    """A reference table: another folder of runs, or a CSV (a paper table typed in: a column named
    as the rows axis holding row labels, optional key columns such as shots, and one column per
    printed header, e.g. `method,eurosat,dtd,Average`); as (keys, {(row, header): number})."""
    spec = rows if isinstance(rows, Rows) else parse_rows(rows)
    rows = spec.axis
    path = Path(other)
    if path.is_dir():
        return [(t.keys, _table_means(t)) for t in build_tables(path, spec, cols, metric=metric)]
    if not path.is_file():
        raise FastpromptError(f"--compare {other} is neither a folder of runs nor a CSV file; check the path")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        require(rows in header, f"--compare {other}: the CSV needs a '{rows}' column with the row labels (its header: {','.join(header)})")
        key_cols = [h for h in header if h in SPLIT_AXES and h not in (rows, cols)]
        value_cols = [h for h in header if h != rows and h not in key_cols and not _NOT_A_MEAN.search(h)]
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
    """Give each table the reference numbers whose keys it matches (a key the reference lacks
    matches all); a reference row without runs here becomes a row of its own, marked `no_runs`."""
    for table in tables:
        for keys, values in reference:
            if all(str(table.keys.get(k)) == v for k, v in keys.items() if k in table.keys):
                table.reference.update(values)
        extra = list(dict.fromkeys(r for r, _ in table.reference if r not in table.rows))
        table.rows += extra
        table.no_runs += extra
        for r in extra:
            for metric, _ in table.average_labels():
                table.average[(r, metric)] = None


# ------------------------------------------------------------------------------ rendering
def _cell_text(stat: Optional[Stat], latex: bool = False, ci: Optional[float] = None) -> str:
    if stat is None:
        return "missing"
    pm = "$\\pm$" if latex else "±"
    spread = stat.std if ci is None else stat.ci
    if stat.std is None:  # H: no spread of its own
        text = f"{stat.mean:.2f}"
    else:
        text = f"{stat.mean:.2f} {pm} " + ("—" if spread is None else f"{spread:.2f}")
    note = f"n={stat.n}"
    if stat.missing:
        note += f"; seed{'s' if len(stat.missing) > 1 else ''} {', '.join(map(str, stat.missing))} missing"
    return f"{text} ({note})"


def spread_note(ci: Optional[float]) -> str:
    """What the ± of a table is, in words (its footer, and its JSON)."""
    if ci is None:
        return ("± is the population standard deviation over seeds (ddof=0, as Dassl's tools/parse_test_res.py); "
                "n: seeds per cell")
    return (f"± is the half-width of the {ci:g}% confidence interval of the mean over seeds (Student's t with n-1 "
            "degrees of freedom and the sample standard deviation, ddof=1; — for one seed); n: seeds per cell")


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
        line = [_row_label(table, r)]
        for col, metric, head in labels:
            stat = table.cells.get((r, col, metric))
            text = "no runs" if r in table.no_runs else _cell_text(stat, latex, table.ci)
            line.append(_with_ref(text, None if stat is None else stat.mean, table.reference.get((r, head))))
        for metric, head in avg_labels:
            value = table.average.get((r, metric))
            line.append(_with_ref("—" if value is None else f"{value:.2f}", value, table.reference.get((r, head))))
        body.append(line)
    return header, body


def _row_label(table: Table, r: str) -> str:
    return f"{r} (no runs)" if r in table.no_runs else r


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
    parts.append(f"_{spread_note(tables[0].ci)}._")
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
        note = _latex_escape(spread_note(table.ci)).replace("±", "$\\pm$")
        lines += ["\\bottomrule", f"\\multicolumn{{{len(header)}}}{{l}}{{\\footnotesize {note}.}} \\\\",
                  "\\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_csv(tables: list[Table]) -> str:
    """One line per table row: the split keys, the row label, then for each column its mean,
    population std and n (`HEAD`, `HEAD std`, `HEAD n`), the Average, `HEAD ciLEVEL` (the
    interval's half-width) with --ci and `HEAD ref` with --compare."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    last_header = None
    for table in tables:
        keys = list(table.keys)
        header = keys + [table.rows_axis]
        for _, _, head in table.labels():
            header += [head, f"{head} std", f"{head} n"] + ([f"{head} ci{table.ci:g}"] if table.ci is not None else []) \
                + ([f"{head} ref"] if table.reference else [])
        header += [h for _, h in table.average_labels()]
        if header != last_header:
            writer.writerow(header)
            last_header = header
        for r in table.rows:
            line = [table.keys[k] for k in keys] + [_row_label(table, r)]
            for col, metric, head in table.labels():
                stat = table.cells.get((r, col, metric))
                line += ["" if stat is None else f"{stat.mean:.4f}", "" if stat is None or stat.std is None else f"{stat.std:.4f}",
                         "" if stat is None else stat.n]
                if table.ci is not None:
                    line.append("" if stat is None or stat.ci is None else f"{stat.ci:.4f}")
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
                if table.ci is not None:
                    entry["ci_half_width"] = None if stat is None else stat.ci
                if table.reference:
                    entry["reference"] = table.reference.get((r, head))
                cells.append(entry)
        average = [{table.rows_axis: r, "metric": m, "mean": table.average.get((r, m))}
                   for r in table.rows for m, _ in table.average_labels()]
        record = {"keys": table.keys, "rows": table.rows_axis, "cols": table.cols_axis, "targets": table.targets,
                  "cells": cells, "average": average, "spread": spread_note(table.ci)}
        if table.row_options:
            record["row_options"] = list(table.row_options)
        if table.ci is not None:
            record["ci"] = table.ci
        if table.no_runs:
            record["no_runs"] = table.no_runs
        out.append(record)
    return json.dumps(out, indent=2) + "\n"


RENDERERS = {"md": to_markdown, "csv": to_csv, "json": to_json, "latex": to_latex}


def report(root, fmt: str = "md", rows: str = "method", cols: str = "dataset", compare: Optional[str] = None,
           ci: Optional[float] = None, metric: str = "acc") -> str:
    """The report of `metric` (acc, per-class-acc) of the runs under `root` in format `fmt` (md,
    csv, json, latex); `rows` may name method options after the axis (`method,cavpt.variant`);
    `ci` (e.g. 95) makes the ± that confidence interval of the mean instead of the population std."""
    check_choice("format", fmt, FORMATS)
    spec = parse_rows(rows)
    tables = build_tables(root, spec, cols, ci=ci, metric=metric)
    if compare is not None:
        attach_reference(tables, load_reference(compare, spec, cols, metric))
    return RENDERERS[fmt](tables)
