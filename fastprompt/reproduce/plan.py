"""What `fastprompt reproduce TABLE` will do, resolved once before anything runs.

Layout of `--out` (OUT):
- `OUT/data/DATASET.beton` (+ sidecar): each dataset of the table, prepared from `--data-root`
  (CoOp's layout, `fastprompt prepare coop`) unless it is there already;
- `OUT/rows/ROW/`: one folder per available row (`Row.slug`). A trained row is one sweep
  (`fastprompt sweep`: `DATASET/METHOD/shotsK/seedS/` cells, resumable); its grid is the row's
  datasets x the seeds. Rows of one table may share a method and differ in its options (Table 1's
  two CAVPT rows), which one sweep cannot hold (a cell is named by its method), hence a sweep per
  row. Zero-shot CLIP rows hold `DATASET/zeroshot.json` (once per dataset: with pretrained weights
  the seed changes nothing; per seed, `DATASET/seedS/zeroshot.json`, with random weights);
- `OUT/report.md`, `report.csv`, `report.tex`: the paper's numbers beside ours.

Sweep settings (`--jobs`, `--launcher`, ...) reach every row's `SweepConfig` as given: the flags
are made from SweepConfig's own fields (`sweep_fields`), so a field the sweep gains is a flag here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastprompt.errors import FastpromptError
from fastprompt.reproduce.tables import PaperTable, Row

DATA_DIR = "data"
ROWS_DIR = "rows"
ZEROSHOT_FILE = "zeroshot.json"
# SweepConfig fields reproduce sets itself (the grid, the shared recipe); every other field is a sweep setting
GRID_FIELDS = ("methods", "data", "seeds", "shots", "out", "train", "options", "eval_on")
RUN_FIELDS = ("device", "precision", "num_workers")  # how a run executes (not the recipe): reproduce's own flags


def sweep_fields() -> dict[str, Any]:
    """{field: type} of the SweepConfig fields that are sweep settings (`--jobs`, `--launcher`, ...)."""
    from fastprompt.sweep import SweepConfig

    hints = typing.get_type_hints(SweepConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SweepConfig) if f.name not in GRID_FIELDS}


@dataclass
class DataStep:
    dataset: str
    beton: Path  # OUT/data/DATASET.beton
    action: str  # "skip" (prepared already) or "prepare"
    folder: Optional[Path] = None  # the CoOp folder it is prepared from


@dataclass
class Cell:
    name: str  # as under the row's folder
    action: str  # skip | evaluate | resume | start
    why: str = ""


@dataclass
class RowStep:
    row: Row
    folder: Path  # OUT/rows/ROW
    datasets: list[str]
    sweep: Any = None  # the row's SweepConfig (trained rows)
    zeroshot: list[tuple[str, Optional[int], Path]] = field(default_factory=list)  # (dataset, seed or None, file)
    cells: list[Cell] = field(default_factory=list)


@dataclass
class Plan:
    table: PaperTable
    out: Path
    seeds: list[int]
    data_root: Optional[Path]
    data: list[DataStep]
    rows: list[RowStep]  # the available rows
    unavailable: list[Row]  # rows whose method this fastprompt lacks
    run: dict  # device / precision / num_workers given (TrainConfig fields)

    def counts(self) -> dict[str, int]:
        cells = [c for step in self.rows for c in step.cells]
        return {a: sum(c.action == a for c in cells) for a in ("skip", "evaluate", "resume", "start")}


def row_settings(table: PaperTable, row: Row, dataset: str) -> dict:
    """The TrainConfig fields the row's protocol, the table and the row set on `dataset` (later wins)."""
    from fastprompt.training.protocols import get_protocol

    protocol = row.protocol or table.protocol
    settings = get_protocol(protocol).train_fields(dataset) if protocol else {}
    return {**settings, **table.train, **row.train}


def row_epochs(table: PaperTable, row: Row, dataset: str) -> int:
    """Epochs of one run of `row` on `dataset`, as the trainer resolves them."""
    from fastprompt.training.config import default_epochs

    epochs = row_settings(table, row, dataset).get("epochs")
    return int(epochs) if epochs is not None else default_epochs(table.shots, dataset)


def _seeded(table: PaperTable, row: Row, dataset: str) -> bool:
    """Whether zero-shot CLIP depends on the seed here: only with random weights (--pretrained none)."""
    pretrained = row_settings(table, row, dataset).get("pretrained", "openai")
    return pretrained is None or str(pretrained).lower() == "none"


def _beton_name(path: Path) -> str:
    from fastprompt.data import open_dataset

    return open_dataset(path, tables=False).name


def make_plan(table: PaperTable, out, data_root=None, seeds: Optional[list[int]] = None, run: Optional[dict] = None,
              sweep: Optional[dict] = None, report_only: bool = False) -> Plan:
    """The plan: every check that can fail on bad input runs here, before anything is written.
    `report_only`: the rows' folders alone, for reading what is there (`fastprompt report
    --table`): no data checked, no cell planned."""
    from fastprompt.data.coop import check_coop_folder, find_coop_dataset
    from fastprompt.data.datasets import find_known_dataset
    from fastprompt.sweep import SweepConfig
    from fastprompt.sweep.grid import cell_name, plan as plan_cells, expand

    out = Path(out)
    seeds = list(table.seeds if seeds is None else seeds)
    require_seeds(seeds)
    run = {k: v for k, v in (run or {}).items() if v is not None}
    unknown = sorted(set(run) - set(RUN_FIELDS))
    if unknown:
        raise FastpromptError(f"run settings {', '.join(unknown)} are not reproduce's; use {', '.join(RUN_FIELDS)}")
    sweep = {k: v for k, v in (sweep or {}).items() if v is not None}
    unknown = sorted(set(sweep) - set(sweep_fields()))
    if unknown:
        raise FastpromptError(f"sweep settings {', '.join(unknown)} are not SweepConfig's; use {', '.join(sweep_fields())}")
    SweepConfig(methods=["coop"], data=["-"], seeds=seeds, shots=[table.shots], out=str(out), **sweep)  # its checks, first
    if out.exists() and not out.is_dir():
        raise FastpromptError(f"--out {out} is a file; pass a folder (it is created)")
    if report_only and not out.is_dir():
        raise FastpromptError(f"{out} is not a folder; pass the --out of `fastprompt reproduce {table.name}`")
    available = [r for r in table.rows if r.available]
    needed = list(dict.fromkeys(d for d in table.datasets for r in available if d in r.datasets(table)))

    data = []
    for dataset in ([] if report_only else needed):
        beton = out / DATA_DIR / f"{dataset}.beton"
        if beton.is_file():
            found = _beton_name(beton)
            if found != dataset:
                raise FastpromptError(f"{beton} holds dataset {found!r}, not {dataset!r}; delete it to prepare {dataset} again")
            data.append(DataStep(dataset, beton, "skip"))
            continue
        if find_known_dataset(dataset) is None or find_known_dataset(dataset).layout is None:
            raise FastpromptError(f"{dataset} is not one of CoOp's datasets, so it cannot be prepared from --data-root; "
                                  f"write it as {beton} (`fastprompt prepare ... --out {beton}`) and run again")
        if data_root is None:
            spec = find_coop_dataset(dataset)
            raise FastpromptError(f"{beton} is not prepared yet; pass --data-root DATA, the folder holding CoOp's "
                                  f"dataset folders ({spec.layout.tree()} for {dataset})")
        data.append(DataStep(dataset, beton, "prepare", check_coop_folder(dataset, data_root)))
    ready = {d.dataset for d in data if d.action == "skip"}

    steps = []
    for row in available:
        folder = out / ROWS_DIR / row.slug
        datasets = row.datasets(table)
        step = RowStep(row, folder, datasets)
        if not row.trains:
            for dataset in datasets:
                for seed in (seeds if _seeded(table, row, dataset) else [None]):
                    where = folder / dataset / ("" if seed is None else f"seed{seed}") / ZEROSHOT_FILE
                    step.zeroshot.append((dataset, seed, where))
                    done = where.is_file()
                    step.cells.append(Cell(str(where.relative_to(folder).parent), "skip" if done else "start",
                                           "evaluated" if done else "new"))
            steps.append(step)
            continue
        train = {**table.train, **row.train, **run}
        if row.protocol or table.protocol:
            train["protocol"] = row.protocol or table.protocol
        if table.classes != "all":
            train["classes"] = table.classes  # base-to-new: train on base, every run evaluates base and new
        config = SweepConfig(methods=[row.method], data=[str(out / DATA_DIR / f"{d}.beton") for d in datasets],
                             seeds=seeds, shots=[table.shots], out=str(folder), train=train, options=dict(row.options),
                             **sweep)
        step.sweep = config
        if report_only:
            pass
        elif all(d in ready for d in datasets):  # the sweep's own plan: skipped, resumed, started (checks each cell's run)
            step.cells = [Cell(p.cell.name, p.action, p.why) for p in plan_cells(expand(config))]
        else:
            step.cells = [Cell(cell_name(d, row.method, table.shots, s), "start", "new; its data is prepared first")
                          for d in datasets for s in seeds]
        steps.append(step)
    return Plan(table, out, seeds, None if data_root is None else Path(data_root), data, steps,
                [r for r in table.rows if not r.available], run)


def require_seeds(seeds: list[int]) -> None:
    from fastprompt.validation import check_int, require

    require(len(seeds) > 0, "--seeds is empty; give at least one, e.g. --seeds 1,2,3")
    require(len(set(seeds)) == len(seeds), f"--seeds {seeds!r} lists a seed twice; give each once")
    for seed in seeds:
        check_int("seeds", seed, minimum=0)


def plan_lines(plan: Plan) -> list[str]:
    """`--dry-run`: what is prepared, and per row every cell with what would happen to it."""
    t = plan.table
    zero = [s.row.label for s in plan.rows if not s.row.trains]
    lines = [f"{t.name}: {len(plan.rows)} rows x {len(t.datasets)} datasets x {len(plan.seeds)} seeds "
             f"(seeds {','.join(map(str, plan.seeds))}) into {plan.out}"
             + (f"; {', '.join(zero)}: once per dataset where the weights are pretrained (the seed changes nothing)" if zero else "")]
    counts = plan.counts()
    lines.append(f"{sum(counts.values())} cells: " + ", ".join(f"{n} {a}" for a, n in counts.items()))
    lines.append(f"data ({plan.out / DATA_DIR}):")
    for d in plan.data:
        lines.append(f"  prepare {d.dataset} from {d.folder} -> {d.beton}" if d.action == "prepare"
                     else f"  skip    {d.dataset} (prepared: {d.beton})")
    for step in plan.rows:
        what = "zero-shot evaluations" if not step.row.trains else "cells (one sweep)"
        options = ", ".join(f"{k}={v}" for k, v in step.row.options.items())
        lines.append(f"{step.row.label}: {step.row.method}{f' ({options})' if options else ''}, "
                     f"{len(step.cells)} {what} in {step.folder}")
        lines += [f"  {c.action:<8} {c.name} ({c.why})" for c in step.cells]
    for row in plan.unavailable:
        lines.append(f"{row.label}: not available (method {row.method} is not in this fastprompt; `fastprompt methods`); "
                     "its printed numbers are shown without runs")
    return lines


# ------------------------------------------------------------------------------ --list
def _bench_rate(records: list[dict], method: str, clip: str) -> Optional[float]:
    """Images/s of `method`'s fast training step at `clip` in `fastprompt bench --json` records."""
    rates = [r["images_per_s"] for r in records if r.get("method") == method and r.get("variant") == "fast"
             and r.get("clip") == clip and not r.get("error") and r.get("images_per_s")]
    return max(rates) if rates else None


def read_bench(path) -> list[dict]:
    """The records of `fastprompt bench --json PATH`; FastpromptError naming the file."""
    import json

    try:
        records = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise FastpromptError(f"--bench {path} is not readable JSON ({err}); pass what `fastprompt bench --json FILE` wrote") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise FastpromptError(f"--bench {path} is not a list of bench records; pass what `fastprompt bench --json FILE` wrote")
    return records


def grid_size(table: PaperTable, seeds: Optional[list[int]] = None, bench: Optional[list[dict]] = None) -> dict:
    """Trained runs, zero-shot evaluations, epochs in all and (with bench records) the estimated
    training time in seconds: each run's epochs x training images / the bench's images/s of its
    method (fast variant, same CLIP); evaluation is not counted. `missing` names the rows without
    a bench figure (then no estimate)."""
    from fastprompt.data.datasets import find_known_dataset

    seeds = table.seeds if seeds is None else seeds
    size = {"runs": 0, "zeroshot": 0, "epochs": 0, "seconds": 0.0, "missing": []}
    for row in (r for r in table.rows if r.available):
        for dataset in row.datasets(table):
            if not row.trains:
                size["zeroshot"] += len(seeds) if _seeded(table, row, dataset) else 1
                continue
            epochs = row_epochs(table, row, dataset)
            size["runs"] += len(seeds)
            size["epochs"] += epochs * len(seeds)
            if bench is None:
                continue
            clip = row_settings(table, row, dataset).get("clip", "ViT-B-32")
            rate = _bench_rate(bench, row.method, clip)
            known = find_known_dataset(dataset)
            if rate is None or known is None or known.num_classes is None:
                if f"{row.method} at {clip}" not in size["missing"]:
                    size["missing"].append(f"{row.method} at {clip}")
                continue
            k = known.num_classes if table.classes == "all" else math.ceil(known.num_classes / 2)
            size["seconds"] += len(seeds) * epochs * table.shots * k / rate
    return size


def _hours(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m"


def list_lines(bench_path=None) -> list[str]:
    """`--list`: every shipped table with its source, rows, grid size and, from bench records,
    an estimated training time on the machine that measured them."""
    from fastprompt.reproduce.tables import load_table, table_names

    bench = None if bench_path is None else read_bench(bench_path)
    lines = []
    for name in table_names():
        t = load_table(name)
        size = grid_size(t, bench=bench)
        missing = [r.label for r in t.rows if not r.available]
        head = f"{name}: {t.title}"
        lines.append(head)
        lines.append(f"  source: {t.source.paper}, {t.source.table}" + (f" (arXiv {t.source.arxiv})" if t.source.arxiv else ""))
        lines.append(f"  {len(t.rows)} rows x {len(t.datasets)} datasets x {len(t.seeds)} seeds: {size['runs']} training runs, "
                     f"{size['epochs']} epochs in all" + (f", {size['zeroshot']} zero-shot evaluations" if size["zeroshot"] else "")
                     + (f"; not available: {', '.join(missing)}" if missing else ""))
        if bench is None:
            lines.append("  estimated time: no bench figures (pass --bench FILE, written by `fastprompt bench --json FILE` on this machine)")
        elif size["missing"]:
            lines.append(f"  estimated time: no bench figure for {', '.join(size['missing'])} in {bench_path}")
        else:
            lines.append(f"  estimated time: {_hours(size['seconds'])} of training steps at the bench's images/s (evaluation not counted)")
    return lines
