"""Running a `Plan`: prepare the missing .betons, evaluate the zero-shot rows, run each trained
row's sweep (resumable: a second run skips what is done and resumes what was interrupted), and
write the report. A failed cell does not stop the others; `Outcome.failed` names each."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from fastprompt.errors import FastpromptError
from fastprompt.files import write_json
from fastprompt.reproduce.plan import Plan, row_settings


@dataclass
class Outcome:
    prepared: list[str] = field(default_factory=list)  # datasets written to OUT/data
    done: int = 0  # cells that finished now
    skipped: int = 0  # cells finished before
    failed: dict = field(default_factory=dict)  # "ROW: CELL" -> error
    reports: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _prepare_data(plan: Plan, say: Callable[[str], None], outcome: Outcome) -> None:
    from fastprompt.data.coop import write_coop

    steps = [d for d in plan.data if d.action == "prepare"]
    if steps:
        (plan.out / "data").mkdir(parents=True, exist_ok=True)
    for d in steps:
        say(f"prepare {d.dataset} from {d.folder}")
        summary = write_coop(d.dataset, plan.data_root, d.beton)
        say(summary.line())
        outcome.prepared.append(d.dataset)


def _zeroshot(plan: Plan, step, say: Callable[[str], None], outcome: Outcome) -> None:
    from fastprompt.training import zeroshot_eval

    table = plan.table
    for dataset, seed, path in step.zeroshot:
        if path.is_file():
            outcome.skipped += 1
            continue
        settings = row_settings(table, step.row, dataset)
        kwargs = dict(clip=settings.get("clip", "ViT-B-32"), pretrained=settings.get("pretrained", "openai"),
                      template=settings.get("template"), device=plan.run.get("device", "auto"),
                      precision=plan.run.get("precision", "auto"), num_workers=plan.run.get("num_workers"),
                      seed=1 if seed is None else seed)
        beton = str(plan.out / "data" / f"{dataset}.beton")
        classes = ("all",) if table.classes == "all" else ("base", "new")
        name = f"{step.row.label}: {path.relative_to(step.folder).parent}"
        say(f"zero-shot {name}")
        try:
            accuracy = {("acc" if c == "all" else c): zeroshot_eval(beton, classes=c, **kwargs)["test_accuracy"]
                        for c in classes}
        except FastpromptError as err:
            outcome.failed[name] = str(err)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"method": "zeroshot", "dataset": dataset, "seed": seed, "accuracy": accuracy,
                          "settings": {k: v for k, v in kwargs.items() if k != "num_workers"}})
        outcome.done += 1


def run_plan(plan: Plan, console=None, say: Optional[Callable[[str], None]] = None) -> Outcome:
    """Execute `plan` (from `make_plan`); `console` gets each sweep's progress, `say` one line per step."""
    from fastprompt.reproduce.report import write_reports
    from fastprompt.sweep import prepare, run_sweep

    say = say or (lambda line: None)
    outcome = Outcome()
    plan.out.mkdir(parents=True, exist_ok=True)
    _prepare_data(plan, say, outcome)
    for step in plan.rows:
        if not step.row.trains:
            _zeroshot(plan, step, say, outcome)
            continue
        say(f"{step.row.label}: sweep {step.folder}")
        result = run_sweep(step.sweep, console=console, planned=prepare(step.sweep))  # planned again: the data exist now
        outcome.done += len(result.done)
        outcome.skipped += len(result.skipped)
        for cell, error in {**result.failed, **{c: "interrupted" for c in result.interrupted}}.items():
            outcome.failed[f"{step.row.label}: {cell}"] = error
    outcome.reports = write_reports(plan)
    return outcome
