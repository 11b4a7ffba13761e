"""The sweep figure: test accuracy against shots per method, mean over seeds with the seed
spread (± std) as a band, one panel per dataset (the style of CoOp's Figure 3: log2 shot axis
1, 2, 4, 8, 16, one line per method, markers at the measured shots).

The numbers come from `fastprompt.sweep.report` (the same grouping, identity check and std),
so the figure and the table never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.files import atomic_write, path_component


def shots_curves(root) -> dict:
    """{dataset: {method: [(shots, mean, std, n), ...] by shots}} of the in-domain test
    accuracy ("all" shots are left out: they have no place on a shots axis)."""
    from fastprompt.sweep.report import build_tables

    curves: dict = {}
    for table in build_tables(root, rows="method", cols="shots"):
        if table.metrics != ("acc",) or table.keys.get("classes") != "all":
            continue  # base-to-new tables have no single accuracy
        if "source" in table.keys and table.keys["source"] != table.keys["dataset"]:
            continue  # cross-dataset targets
        dataset = table.keys["dataset"]
        for method in table.rows:
            points = []
            for shots in table.cols:
                stat = table.cells.get((method, shots, "acc"))
                if stat is not None and shots != "all":
                    points.append((int(shots), stat.mean, stat.std, stat.n))
            if points:
                curves.setdefault(dataset, {})[method] = sorted(points)
    if not curves:
        raise FastpromptError(f"{root} holds no few-shot accuracy (classes=all) to plot against shots; run a sweep with --shots 1,2,4,8,16")
    return curves


def plot_shots(root, out: Optional[str] = None) -> list[Path]:
    """One PNG per dataset under `out` (default ROOT/figures), `shots-DATASET.png`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = shots_curves(root)
    names = {d: path_component(d, f"dataset (the \"dataset\" of a results.json under {root})",
                               "correct that run's results.json, or move the run out of the folder") for d in curves}
    folder = Path(out) if out is not None else Path(root) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset, methods in curves.items():
        fig, ax = plt.subplots(figsize=(4.2, 3.4), dpi=150)
        all_shots = sorted({s for points in methods.values() for s, *_ in points})
        for method, points in methods.items():
            shots = [p[0] for p in points]
            mean = [p[1] for p in points]
            std = [p[2] for p in points]
            (line,) = ax.plot(shots, mean, marker="o", markersize=4, linewidth=1.5, label=method)
            ax.fill_between(shots, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_shots)
        ax.set_xticklabels([str(s) for s in all_shots])
        ax.set_xlabel("Number of labeled training examples per class")
        ax.set_ylabel("Score (%)")
        ax.set_title(dataset)
        ax.grid(True, linestyle=":", linewidth=0.6)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"shots-{names[dataset]}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths
