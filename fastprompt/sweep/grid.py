"""A sweep's grid: datasets x methods x shots x seeds, one `TrainConfig` per cell, and the
plan that says for each cell whether it is skipped, evaluated, resumed or started.

Cells are named `DATASET/METHOD/shotsK/seedS` (`shotsall` for every training image) under
the sweep's folder; `sweep.json` there records the grid and the shared settings. A cell's
folder that holds another run (by `fastprompt.training.identity`) stops the sweep before
any work, naming the cell and the first differing field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastprompt.errors import FastpromptError
from fastprompt.files import path_component
from fastprompt.validation import check_int, check_choice, require

LAUNCHERS = ("local", "slurm", "submitit-local")  # submitit-local: submitit's LocalExecutor (the slurm path on one machine)
# TrainConfig fields the grid sets per cell; every other field is shared by all cells
GRID_FIELDS = ("method", "data", "shots", "seed", "out", "options")
ACTIONS = ("skip", "evaluate", "resume", "start")


@dataclass
class SweepConfig:
    methods: list[str]  # names from fastprompt.list_methods()
    data: list[str]  # .beton paths (their sidecars beside them)
    seeds: list[int]
    shots: list[Optional[int]]  # None: every training image
    out: str  # the sweep's folder: sweep.json, sweep-log.jsonl and one folder per cell
    train: dict = field(default_factory=dict)  # shared TrainConfig fields (lr, epochs, clip, classes, ...)
    options: dict = field(default_factory=dict)  # method options; each goes to the grid's methods that have it
    eval_on: list[str] = field(default_factory=list)  # extra test sets evaluated by every cell (cross-dataset)
    jobs: Optional[int] = None  # cells at once on this machine; None: one per visible GPU, 1 on CPU
    launcher: str = "local"  # local | slurm | submitit-local
    slurm_partition: Optional[str] = None
    slurm_gpus: int = 1  # GPUs per cell under slurm
    slurm_time: int = 240  # minutes per cell under slurm (a cell that runs out is requeued and resumes)
    tensorboard: bool = False  # per-epoch scalars of every cell in CELL/tensorboard
    pack: Any = "auto"  # cells trained together, packed: "off" (1), "auto" (measured) or N (fastprompt.training.plan.parse_pack)

    def __post_init__(self) -> None:
        for name in ("methods", "data", "seeds", "shots"):
            values = getattr(self, name)
            require(len(values) > 0, f"{name} is empty; give at least one (e.g. --{name} ...)")
            require(len(set(values)) == len(values), f"{name}={values!r} lists a value twice; give each once")
        for seed in self.seeds:
            check_int("seeds", seed, minimum=0)
        for shots in self.shots:
            check_int("shots", shots, allow_none=True)
        check_int("jobs", self.jobs, allow_none=True)
        from fastprompt.training.plan import parse_pack

        self.pack = parse_pack(self.pack)  # off -> 1
        check_choice("launcher", self.launcher, LAUNCHERS)
        check_int("slurm_gpus", self.slurm_gpus, minimum=0)
        check_int("slurm_time", self.slurm_time)
        shared = set(self.train) & set(GRID_FIELDS)
        require(not shared, f"train={sorted(shared)} are grid axes, not shared settings; use methods/data/shots/seeds")
        names = {f.name for f in dataclasses.fields(_train_config_cls())}
        unknown = sorted(set(self.train) - names)
        require(not unknown, f"unknown train setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names - set(GRID_FIELDS)))}")


def _train_config_cls():
    from fastprompt.training.config import TrainConfig

    return TrainConfig


@dataclass
class Cell:
    name: str  # DATASET/METHOD/shotsK/seedS, the folder under the sweep's out
    config: Any  # its TrainConfig as the sweep asks for it (out = the cell's folder)
    plan: Any  # its RunPlan (`fastprompt.training.plan.plan_run`): what the worker executes
    eval_on: tuple[tuple[str, str], ...] = ()  # (dataset name, .beton path) of each extra test set

    @property
    def dir(self) -> Path:
        return Path(self.config.out)

    def eval_file(self, dataset: str, data: str) -> Path:
        """Where `fastprompt.training.evaluate_run` writes this cell's result on `data` (dataset `dataset`)."""
        from fastprompt.training.runfiles import eval_file

        return eval_file(self.dir, dataset, data, "all")

    def payload(self) -> dict:
        """What a worker process needs to run the cell (plain data: pickles and crosses machines): its
        plan, resolved here once (the worker resolves nothing)."""
        return {"name": self.name, "plan": self.plan.to_dict(), "eval_on": [list(e) for e in self.eval_on]}


@dataclass
class PlannedCell:
    cell: Cell
    action: str  # skip | evaluate | resume | start
    why: str = ""  # what the folder holds
    epochs_done: int = 0  # epochs its checkpoint holds: training goes on at epoch epochs_done + 1 (1-based)

    def from_epoch(self) -> str:
        """Where training goes on, `K/N` (1-based); `-` for a cell that does not train."""
        if self.action in ("skip", "evaluate"):
            return "-"
        return f"{self.epochs_done + 1}/{self.cell.plan.config.epochs}"


def cell_name(dataset: str, method: str, shots: Optional[int], seed: int) -> str:
    """DATASET/METHOD/shotsK/seedS; each part one plain name (`fastprompt.files.path_component`:
    a dataset name from a sidecar that would reach outside the sweep's folder is refused)."""
    fix = 'set the sidecar\'s "name" to a plain name such as "eurosat"'
    parts = (path_component(dataset, "dataset name", fix), path_component(method, "method", "use a method of `fastprompt methods`"))
    return f"{parts[0]}/{parts[1]}/shots{'all' if shots is None else shots}/seed{seed}"


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _options_for(method: str, options: dict) -> dict:
    from fastprompt.methods import METHODS

    valid = set(METHODS[method].options.field_names())
    return {k: v for k, v in options.items() if k in valid}


def _groups_for(method: str, values: dict) -> dict:
    from fastprompt.methods import METHODS

    declared = {g.name for g in METHODS[method].groups}
    return {k: v for k, v in values.items() if k in declared}


def expand(config: SweepConfig) -> list[Cell]:
    """The grid's cells in sweep order (dataset, method, shots, seed), each with a validated
    TrainConfig and its plan; bad settings fail here, before anything is written."""
    from fastprompt.data import open_dataset
    from fastprompt.methods import METHODS
    from fastprompt.training.plan import plan_run

    TrainConfig = _train_config_cls()
    for method in config.methods:
        require(method in METHODS, f"unknown method '{method}' in --methods; choose from {', '.join(METHODS)}")
    for key in config.options:
        require(any(_options_for(m, {key: None}) for m in config.methods),
                f"--set {key}=...: no method of {','.join(config.methods)} has option '{key}'; check the name")
    for key in ("group_lr", "group_warmup_epochs"):
        flag = "--lr" if key == "group_lr" else "--warmup-epochs"
        for group in config.train.get(key, {}):
            require(any(_groups_for(m, {group: None}) for m in config.methods),
                    f"{flag}.{group}: no method of {','.join(config.methods)} trains a '{group}' group; drop the flag")

    datasets = {}
    for path in config.data:
        ds = open_dataset(path)
        require(ds.name not in datasets, f"--data {path} and {datasets.get(ds.name, (None,))[0]} are both dataset "
                                         f"'{ds.name}'; a sweep takes each dataset once")
        datasets[ds.name] = (_absolute(str(ds.path)), ds.template, ds)
    # each extra test set is one dataset name (its eval-NAME-all.json and its report column): two files of
    # one name are refused, and a target named like a --data dataset must be that same file (then a cell
    # of that dataset skips it: results.json already holds its test accuracy)
    targets, given = [], {name: path for name, (path, _, _) in datasets.items()}
    for path in config.eval_on:
        ds = open_dataset(path)
        target = _absolute(str(ds.path))
        seen = given.get(ds.name)
        if seen is not None and seen != target:
            flag = "--data" if ds.name in datasets else "--eval-on"
            raise FastpromptError(f"--eval-on {path} and {flag} {seen} are both dataset '{ds.name}' but different files; "
                                  f"a sweep evaluates each dataset once: drop one, or give one a distinct \"name\" in its sidecar")
        given[ds.name] = target
        if (ds.name, target) not in targets:
            targets.append((ds.name, target))

    shared = dict(config.train)
    pretrained = shared.get("pretrained")
    if isinstance(pretrained, str) and os.path.isfile(pretrained):
        shared["pretrained"] = _absolute(pretrained)  # a cell's identity does not depend on the working folder
    out = Path(config.out)
    cells = []
    for name, (path, template, ds) in datasets.items():
        for method in config.methods:
            for shots in config.shots:
                for seed in config.seeds:
                    cname = cell_name(name, method, shots, seed)
                    # the dataset's template written out: config.json records the resolved one
                    settings = {**shared, "template": shared.get("template") or template}
                    for key in ("group_lr", "group_warmup_epochs"):  # a group's flag reaches the methods that train it
                        if key in settings:
                            settings[key] = _groups_for(method, settings[key])
                    protocol = settings.pop("protocol", None)
                    cell = dict(method=method, data=path, out=str(out / cname), shots=shots, seed=seed,
                                options=_options_for(method, config.options), **settings)
                    # --protocol: its settings for this dataset, under the sweep's given ones
                    cfg = (TrainConfig(**cell) if protocol is None
                           else TrainConfig.from_protocol(protocol, dataset=name, **cell))
                    # the sweep's settings are its cells' given values (a plan's "cli" source); the rest resolves
                    given = {*cell, *(f"options.{k}" for k in cell["options"])} - ({"template"} if shared.get("template") is None else set())
                    try:
                        planned = plan_run(cfg, given=given, dataset=ds)
                    except FastpromptError as err:  # e.g. a group's warm-up that leaves no epochs: named by its cell
                        raise FastpromptError(f"cell {cname}: {err}") from None
                    cells.append(Cell(cname, cfg, planned, tuple(t for t in targets if t[0] != name)))
    return cells


def plan(cells: list[Cell]) -> list[PlannedCell]:
    """What each cell's folder asks for; FastpromptError naming the cell if one holds another run."""
    from fastprompt.training.identity import first_difference
    from fastprompt.training.runfiles import checkpoint_epoch, read_run_config

    planned = []
    for cell in cells:
        config_path = cell.dir / "config.json"
        if not config_path.is_file():
            planned.append(PlannedCell(cell, "start", "new"))
            continue
        saved = read_run_config(cell.dir, needed=(), fix=f"delete the folder of cell {cell.name} to rerun it")
        # the cell's plan, with the data's content id (a .beton prepared again is other data)
        diff = first_difference(cell.plan.expected(), saved)
        if diff is not None:
            key, mine, theirs = diff
            raise FastpromptError(
                f"cell {cell.name} holds a run with {key}={theirs!r}, this sweep has {key}={mine!r}; "
                f"use another --out or delete {cell.dir}"
            )
        if (cell.dir / "results.json").is_file():
            missing = [name for name, data in cell.eval_on if not cell.eval_file(name, data).is_file()]
            planned.append(PlannedCell(cell, "evaluate", f"finished; to evaluate on {', '.join(missing)}") if missing
                           else PlannedCell(cell, "skip", "finished"))
        elif (done := checkpoint_epoch(cell.dir)) is not None:
            planned.append(PlannedCell(cell, "resume", f"a checkpoint after epoch {done}/{cell.plan.config.epochs}", done))
        elif any(cell.dir.glob("checkpoint*")):  # a damaged record or an older format: the trainer names the fix
            planned.append(PlannedCell(cell, "resume", "a checkpoint without a readable epoch (training names the fix)"))
        else:
            planned.append(PlannedCell(cell, "start", "stopped before its first checkpoint"))
    return planned


def sweep_record(config: SweepConfig, cells: list[Cell]) -> dict:
    """sweep.json: the grid, the shared settings and the cells."""
    return {
        "grid": {"data": [c for c in config.data], "datasets": list(dict.fromkeys(c.name.split("/")[0] for c in cells)),
                 "methods": config.methods, "shots": config.shots, "seeds": config.seeds},
        "train": config.train,
        "options": config.options,
        "eval_on": config.eval_on,
        "cells": [c.name for c in cells],
    }
