"""`fastprompt compare`: zero-shot vs trained accuracy of finished runs, one row per run.

For every run: the zero-shot accuracy of the CLIP it started from (its --clip/--pretrained,
template and classes, on its dataset's test split; computed once per distinct setting), its
trained test accuracy (`results.json`), the gain in points, its training time (the epochs'
seconds in `metrics.jsonl`, evaluation and set-up excluded) and its throughput, split as
`training_speed` says: the first epoch's seconds apart (it pays one-off costs a longer run
does not pay again: first calls, compilation on a fresh machine) and the steady rate, images
per second over the later epochs. The demo's last step; it works for any runs.
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
    train_seconds: float  # every epoch
    images_per_s: float  # over every epoch, the first included
    first_epoch_seconds: float
    steady_images_per_s: Optional[float]  # over epochs 2..N; None for a one-epoch run

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


def training_speed(lines: list[dict]) -> dict:
    """From a run's metrics.jsonl lines: `train_seconds` and `images_per_s` over every epoch,
    `first_epoch_seconds`, and `steady_images_per_s` over the epochs after the first (None when
    there is only one). The first epoch is apart because it is not the rate a longer run gets:
    in the demo it was 22.6 of CoOp's 24.2 s on a busy machine (issue 25 §8)."""
    seconds = [float(line["seconds"]) for line in lines]  # (epochs,)
    images = [int(line["images"]) for line in lines]  # (epochs,)
    total, later = sum(seconds), sum(seconds[1:])
    return {"train_seconds": total, "images_per_s": sum(images) / total if total > 0 else 0.0,
            "first_epoch_seconds": seconds[0] if seconds else 0.0,
            "steady_images_per_s": sum(images[1:]) / later if later > 0 else None}


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
        speed = training_speed(read_metrics(path / "metrics.jsonl"))
        rows.append(Comparison(run=str(path), method=run.method, zero_shot_accuracy=zero_shot[key], trained_accuracy=trained,
                               **speed))
    return rows


def comparison_table(rows: list[Comparison]):
    """A rich Table: method, zero-shot %, trained %, gain, train time, first epoch, steady images/s."""
    from rich.table import Table

    table = Table(title="zero-shot CLIP -> prompt-tuned, test accuracy",
                  caption="train time: the epochs alone; images/s: epochs 2..N (the first epoch's one-off costs apart)")
    for name in ("method", "zero-shot", "trained", "gain", "train time", "first epoch", "images/s"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in rows:
        steady = "-" if r.steady_images_per_s is None else f"{r.steady_images_per_s:.0f}"
        table.add_row(r.method, f"{r.zero_shot_accuracy:.1f} %", f"{r.trained_accuracy:.1f} %", f"{r.gain:+.1f} pts",
                      f"{r.train_seconds:.1f} s", f"{r.first_epoch_seconds:.1f} s", steady)
    return table
