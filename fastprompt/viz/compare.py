"""`fastprompt compare`: zero-shot vs trained accuracy of finished runs, one row per run.

For every run: the zero-shot accuracy of the CLIP it started from (its --clip/--pretrained,
template and classes, on its dataset's test split; computed once per distinct setting), its
trained test accuracy (`results.json`), the gain in points, its training time (the epochs'
seconds in `metrics.jsonl`, evaluation and set-up excluded) and its training throughput
(images over those seconds). The demo's last step; it works for any runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.viz.curves import read_metrics
from fastprompt.viz.runs import load_run


@dataclass(frozen=True)
class Comparison:
    run: str
    method: str
    zero_shot_accuracy: float  # %
    trained_accuracy: float  # %
    train_seconds: float
    images_per_s: float

    @property
    def gain(self) -> float:
        """Trained minus zero-shot accuracy, in points."""
        return self.trained_accuracy - self.zero_shot_accuracy

    def to_dict(self) -> dict:
        return {**asdict(self), "gain": self.gain}


def _trained_accuracy(run: Path) -> float:
    from fastprompt.sweep.report import read_results

    path = run / "results.json"
    if not path.is_file():
        raise FastpromptError(f"{run} has no results.json; pass the --out of a finished `fastprompt train`")
    results = read_results(path)
    if results["classes"] == "base":
        raise FastpromptError(f"{run} is a base-to-new run (no single test accuracy); compare runs trained on all classes")
    return float(results["test_accuracy"])


def compare_runs(run_dirs: list[str], *, device: str = "cpu", num_workers: Optional[int] = None) -> list[Comparison]:
    """One `Comparison` per run, in the order given."""
    from fastprompt.training.evaluate import evaluate

    if not run_dirs:
        raise FastpromptError("give at least one run directory")
    zero_shot: dict[tuple, float] = {}
    rows = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        trained = _trained_accuracy(path)
        run = load_run(run_dir, device=device)
        c = run.config
        key = (c["data"], c["clip"], c["pretrained"], tuple(run.model.templates), run.classes, c["weights_id"])
        if key not in zero_shot:
            zero_shot[key] = evaluate(run.zero_shot(), run.data, "test", run.classes, device=run.device,
                                      num_workers=num_workers)
        lines = read_metrics(path / "metrics.jsonl")
        seconds = sum(float(line["seconds"]) for line in lines)
        images = sum(int(line["images"]) for line in lines)
        rows.append(Comparison(run=str(path), method=run.method, zero_shot_accuracy=zero_shot[key], trained_accuracy=trained,
                               train_seconds=seconds, images_per_s=images / seconds if seconds > 0 else 0.0))
    return rows


def comparison_table(rows: list[Comparison]):
    """A rich Table: method, zero-shot %, trained %, gain, train time, images/s."""
    from rich.table import Table

    table = Table(title="zero-shot CLIP -> prompt-tuned, test accuracy")
    for name in ("method", "zero-shot", "trained", "gain", "train time", "images/s"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in rows:
        table.add_row(r.method, f"{r.zero_shot_accuracy:.1f} %", f"{r.trained_accuracy:.1f} %", f"{r.gain:+.1f} pts",
                      f"{r.train_seconds:.1f} s", f"{r.images_per_s:.0f}")
    return table
