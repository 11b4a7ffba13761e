"""The sweep figure: test accuracy against shots per method, mean over seeds with the seed
spread (± population std) as a band, one panel per dataset, in the style of CoOp's Figure 3:
shots 1, 2, 4, 8, 16 on a log2 axis, one line per method, markers at the measured shots, and
zero-shot CLIP as a star at 0 shots.

The numbers come from `fastprompt.sweep.report` (the same grouping, identity check and std),
so the figure and the table never disagree. The zero-shot point is read, not computed: the
JSON that `fastprompt zeroshot` prints, saved under the folder as `zeroshot*.json`
(`fastprompt zeroshot --data eurosat.beton --clip ... > SWEEP/zeroshot-eurosat.json`), for the
dataset and the CLIP (--clip, --pretrained) of the runs; plotting then loads no model. A
figure without one says so in one log line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.files import path_component

log = logging.getLogger(__name__)
FIGSIZE = (5.6, 4.5)  # inches: 560 x 450 px at figures.DPI
ZERO_SHOT_GLOB = "zeroshot*.json"


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


def _clip_of_runs(root: Path) -> dict:
    """{dataset: {(clip, pretrained), ...}} of the runs under `root` trained on it."""
    from fastprompt.sweep.report import load_runs

    measurements, configs = load_runs(root)
    clips: dict = {}
    for m in measurements:
        if m.dataset == m.source and m.classes == "all":
            config = configs[m.run]
            clips.setdefault(m.dataset, set()).add((config.get("clip"), config.get("pretrained")))
    return clips


def zero_shot_points(root) -> dict:
    """{dataset: accuracy %} from the `zeroshot*.json` files under `root` (what `fastprompt
    zeroshot` prints) whose dataset and CLIP are those of the runs on that dataset, all classes.
    FastpromptError naming the file for one that is not such a result, or for two that disagree."""
    from fastprompt.sweep.report import _ACCURACY, _TEXT, _checked, _read_json

    root = Path(root)
    clips = _clip_of_runs(root)
    found: dict = {}  # dataset -> (accuracy, file)
    fields = {"method": ("'zeroshot'", lambda v: v == "zeroshot"), "dataset": _TEXT, "clip": _TEXT,
              "classes": ("'all', 'base' or 'new'", lambda v: v in ("all", "base", "new")), "test_accuracy": _ACCURACY}
    for path in sorted(root.rglob(ZERO_SHOT_GLOB)):
        fix = ("replace it with what `fastprompt zeroshot --data DATA --clip CLIP --pretrained TAG` prints, "
               "or rename it (plot shots reads zeroshot*.json)")
        result = _checked(path, _read_json(path, fix), fields, fix)
        key = (result["clip"], result.get("pretrained"))
        if result["classes"] != "all" or key not in clips.get(result["dataset"], set()):
            continue  # the base or new half, or another CLIP than the runs'
        accuracy = float(result["test_accuracy"])
        seen = found.get(result["dataset"])
        if seen is not None and seen[0] != accuracy:
            raise FastpromptError(f"{seen[1]} and {path} are two zero-shot results for {result['dataset']} with "
                                  f"{key[0]} ({key[1]}) that differ ({seen[0]:.2f} vs {accuracy:.2f}); keep one")
        found[result["dataset"]] = (accuracy, path)
    return {dataset: accuracy for dataset, (accuracy, _) in found.items()}


def draw_shots(dataset: str, methods: dict, zero_shot: Optional[float]):
    """One dataset's figure: a line and seed band per method; zero-shot CLIP as a star at 0 shots."""
    from fastprompt.viz.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    all_shots = sorted({s for points in methods.values() for s, *_ in points})
    for method, points in methods.items():
        shots = [p[0] for p in points]
        mean = [p[1] for p in points]
        std = [p[2] for p in points]
        (line,) = ax.plot(shots, mean, marker="o", markersize=4, linewidth=1.5, label=method)
        ax.fill_between(shots, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    if zero_shot is None:
        ax.set_xscale("log", base=2)
        ticks = all_shots
    else:  # 0 shots on the axis: linear from 0 to 1, log2 above (1 to 2 as wide as 0 to 1), as CoOp's Fig. 3
        ax.plot([0], [zero_shot], marker="*", markersize=11, linestyle="none", color="tab:purple",
                label="Zero-shot CLIP")
        ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)  # matplotlib widens it by base / (base - 1)
        ticks = [0, *all_shots]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(s) for s in ticks])
    ax.minorticks_off()
    ax.set_xlabel("Number of labeled training examples per class")
    ax.set_ylabel("Score (%)")
    ax.set_title(dataset)
    ax.grid(True, linestyle=":", linewidth=0.6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_shots(root, out: Optional[str] = None, fmt: str = "png") -> list[Path]:
    """One figure per dataset under `out` (default ROOT/figures), `shots-DATASET.png` (or .pdf); their paths."""
    from fastprompt.viz.figures import check_format, figures_dir, save_figure

    check_format(fmt)
    curves = shots_curves(root)
    names = {d: path_component(d, f"dataset (the \"dataset\" of a results.json under {root})",
                               "correct that run's results.json, or move the run out of the folder") for d in curves}
    zero_shot = zero_shot_points(root)
    folder = figures_dir(Path(root), out)
    paths = []
    for dataset, methods in curves.items():
        path = save_figure(draw_shots(dataset, methods, zero_shot.get(dataset)), folder, f"shots-{names[dataset]}", fmt)
        if dataset not in zero_shot:
            log.warning("%s has no zero-shot point: no %s under %s for %s with the runs' CLIP; add one with "
                        "`fastprompt zeroshot --data DATA --clip CLIP --pretrained TAG > %s/zeroshot-%s.json`",
                        path, ZERO_SHOT_GLOB, root, dataset, root, names[dataset])
        paths.append(path)
    return paths
