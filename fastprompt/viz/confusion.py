"""`fastprompt plot confusion RUN`: the confusion matrix of a finished run's reported model on its
test split, from `results.json` (no model is loaded).

Each row (true class) is drawn as the fraction of that class's test images predicted as each
column, so classes of any size compare (Dassl's `TEST.COMPUTE_CMAT` normalises the same way,
`normalize="true"`); a cell shows its count where the matrix is small enough to read. A
base-to-new run draws base and new side by side. The figure's title names the run's method,
dataset, test and mean per-class accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.viz.figures import check_format, figures_dir, pyplot, save_figure

PANEL_INCHES = 6.0  # one panel is 6 x 6 inches: 600 x 600 px at figures.DPI (plus the title's strip)
COUNTS_UP_TO = 20  # classes up to which every cell is annotated with its count
NAMES_UP_TO = 60  # classes up to which the axes carry class names (beyond, class indices every few)


def confusion_panels(run: Path) -> tuple[dict, list[tuple[str, list[str], list[list[int]], float, float]]]:
    """(results.json, [(panel title, class names, confusion K x K, accuracy, mean per-class accuracy)]):
    one panel for a run on every class, base and new for a base-to-new run."""
    path = run / "results.json"
    if not path.is_file():
        raise FastpromptError(f"{run} has no results.json; pass the --out of a finished `fastprompt train`")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FastpromptError(f"{path} is unreadable ({err}); train the run again with --restart") from None
    if not isinstance(results, dict):
        raise FastpromptError(f"{path} is not a run's results (not a JSON object); train the run again with --restart")
    halves = [("base", "base_"), ("new", "new_")] if results.get("classes") == "base" else [("test", "")]
    panels = []
    for title, prefix in halves:
        confusion, per_class = results.get(f"{prefix}confusion"), results.get(f"{prefix}per_class")
        accuracy = results.get(f"{prefix}accuracy" if prefix else "test_accuracy")
        mean = results.get(f"{prefix}mean_per_class_accuracy")
        if confusion is None or per_class is None or mean is None:
            raise FastpromptError(f"{path} holds no {prefix}confusion and {prefix}per_class (written before fastprompt "
                                  "kept per-class results); evaluate the run again with its train command and --force-eval")
        names = list(per_class) if isinstance(per_class, dict) else []
        k = len(names)
        if not (k and isinstance(confusion, list) and len(confusion) == k and all(
                isinstance(row, list) and len(row) == k and all(isinstance(c, int) and c >= 0 for c in row)
                for row in confusion)):
            raise FastpromptError(f"{path}: {prefix}confusion is not a {k} x {k} matrix of counts (one row and column "
                                  f"per class of {prefix}per_class); evaluate the run again with its train command and "
                                  "--force-eval")
        panels.append((title, names, confusion, float(accuracy), float(mean)))
    return results, panels


def draw_confusion(results: dict, panels: list):
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_INCHES * len(panels), PANEL_INCHES + 0.6), squeeze=False)
    for ax, (title, names, confusion, accuracy, mean) in zip(axes[0], panels):
        counts = np.asarray(confusion, dtype=np.float64)  # (K, K)
        fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # (K, K): each row sums to 1 (or 0)
        k = len(names)
        ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        if k <= COUNTS_UP_TO:
            for i in range(k):
                for j in range(k):
                    if counts[i, j]:
                        ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                                color="white" if fractions[i, j] > 0.5 else "black")
        ticks = list(range(k)) if k <= NAMES_UP_TO else list(range(0, k, max(1, k // 20)))
        labels = [names[i] for i in ticks] if k <= NAMES_UP_TO else [str(i) for i in ticks]
        ax.set_xticks(ticks, labels, rotation=90, fontsize=6 if k > 20 else 7)
        ax.set_yticks(ticks, labels, fontsize=6 if k > 20 else 7)
        ax.set_xlabel("predicted class", fontsize=8)
        ax.set_ylabel("true class", fontsize=8)
        ax.set_title(f"{title}: accuracy {accuracy:.2f}%, mean per class {mean:.2f}%", fontsize=9)
    model = results.get("final_model", "last")
    epoch = results.get("reported_epoch")
    fig.suptitle(f"{results.get('method')} on {results.get('dataset')}, {model} model"
                 + (f" (epoch {epoch})" if epoch is not None else ""), fontsize=10)
    fig.subplots_adjust(left=0.2 / len(panels), right=0.98, bottom=0.2, top=0.9, wspace=0.45)
    return fig


def plot_confusion(run: str, *, out: Optional[str] = None, fmt: str = "png") -> Path:
    """Write the confusion-matrix figure of a finished run; returns its path."""
    check_format(fmt)
    root = Path(run)
    if not root.is_dir():
        raise FastpromptError(f"{root} is not a directory; pass the --out of a finished `fastprompt train`")
    results, panels = confusion_panels(root)
    return save_figure(draw_confusion(results, panels), figures_dir(root, out), "confusion", fmt)
