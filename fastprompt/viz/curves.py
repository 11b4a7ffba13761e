"""`fastprompt plot curves`: training curves of a run, or of every run of a sweep, from `metrics.jsonl`.

Three panels against the epoch: the training loss, every `*accuracy*` key (training
accuracy, and validation accuracy at the epochs whose line has it: `val_accuracy` every E
epochs with --eval-every E), and every `lr*` key (one learning rate per parameter group where
the trainer logs them, e.g. `lr` or `lr/text`). The final test accuracy of a finished run
(`results.json` beside its metrics: `test_accuracy`, or `base_accuracy` and `new_accuracy`) is a
star on the accuracy panel at its last epoch. A sweep is a folder whose sub-folders hold runs:
each run is one line per key, labelled by its folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.viz.figures import check_format, figures_dir, pyplot, save_figure

FIGSIZE = (13.5, 3.8)  # inches: 1350 x 380 px at figures.DPI


def read_metrics(path: Path) -> list[dict]:
    """The epoch lines of a metrics.jsonl (FastpromptError naming the line if one is not JSON)."""
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            lines.append(flatten(json.loads(text)))
        except json.JSONDecodeError:
            raise FastpromptError(f"{path} line {number} is not JSON; the run's log is damaged (retrain, or delete the line)") from None
    return lines


def flatten(mapping: dict, sep: str = "/") -> dict:
    """One level of nesting spelled out: {"lr": {"text": x}} -> {"lr/text": x} (a metrics line;
    `compare` labels identity fields with sep ".": `group_lr.visual`)."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update({f"{key}{sep}{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


FINAL_KEYS = ("test_accuracy", "base_accuracy", "new_accuracy")  # results.json's accuracies drawn as final points


def _metrics_files(run_or_sweep: str) -> dict[str, Path]:
    root = Path(run_or_sweep)
    if not root.is_dir():
        raise FastpromptError(f"{root} is not a directory; pass a run's --out or a folder of runs")
    if (root / "metrics.jsonl").is_file():
        return {root.name: root / "metrics.jsonl"}
    return {str(p.parent.relative_to(root)): p for p in sorted(root.rglob("metrics.jsonl"))}


def find_finals(run_or_sweep: str) -> dict[str, dict]:
    """{label: {key: final test accuracy %}} of the finished runs (`results.json`, checked) of
    `run_or_sweep`, labelled as `find_runs` labels them."""
    from fastprompt.sweep.report import read_results

    finals = {}
    for label, path in _metrics_files(run_or_sweep).items():
        if (path.parent / "results.json").is_file():
            results = read_results(path.parent / "results.json")
            finals[label] = {k: float(results[k]) for k in FINAL_KEYS if k in results}
    return finals


def find_runs(run_or_sweep: str) -> dict[str, list[dict]]:
    """{label: epoch lines} of the run at `run_or_sweep`, or of every run below it (a sweep)."""
    root = Path(run_or_sweep)
    files = _metrics_files(run_or_sweep)
    runs = {label: read_metrics(path) for label, path in files.items()}
    runs = {label: lines for label, lines in runs.items() if lines}
    if not runs:
        raise FastpromptError(f"{root} holds no metrics.jsonl with a finished epoch; train a run into it first")
    return runs


def draw_curves(runs: dict[str, list[dict]], finals: Optional[dict[str, dict]] = None):
    """The figure of `runs` ({label: epoch lines}), with each run's `finals` ({label: {key: %}})
    as stars at its last epoch on the accuracy panel."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE)
    panels = (("loss", lambda k: k == "loss"), ("accuracy (%)", lambda k: "accuracy" in k),
              ("learning rate", lambda k: k.startswith("lr")))
    single = len(runs) == 1
    for ax, (title, wanted) in zip(axes, panels):
        for label, lines in runs.items():
            keys = sorted({k for line in lines for k in line if wanted(k)})
            for key in keys:
                points = [(line["epoch"], line[key]) for line in lines if key in line and "epoch" in line]
                if points:
                    xs, ys = zip(*points)
                    name = key if single else f"{label}: {key}"
                    ax.plot(xs, ys, marker="o", markersize=2.5, label=name)
            if title.startswith("accuracy") and (finals or {}).get(label):
                last = max((line["epoch"] for line in lines if "epoch" in line), default=0)
                for key, value in finals[label].items():
                    name = f"{key} (final)" if single else f"{label}: {key} (final)"
                    ax.plot([last], [value], marker="*", markersize=9, linestyle="none", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines and (not single or len(ax.lines) > 1 or title != "loss"):
            ax.legend(fontsize=6, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.15, top=0.9, wspace=0.25)
    return fig


def plot_curves(run_or_sweep: str, *, out: Optional[str] = None, fmt: str = "png") -> Path:
    """Write the training-curve figure of a run or a sweep; returns its path."""
    check_format(fmt)
    runs = find_runs(run_or_sweep)
    stem = "curves-loss-accuracy-lr" if len(runs) == 1 else f"curves-loss-accuracy-lr-{len(runs)}-runs"
    finals = {label: f for label, f in find_finals(run_or_sweep).items() if label in runs}
    return save_figure(draw_curves(runs, finals), figures_dir(Path(run_or_sweep), out), stem, fmt)
