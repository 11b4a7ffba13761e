"""`fastprompt compare`: zero-shot vs trained accuracy of finished runs, one row per run.

For every run: the zero-shot accuracy of the CLIP it started from (its --clip/--pretrained,
template and classes, on its dataset's test split; computed once per distinct setting), its
trained test accuracy (`results.json`), the gain in points, its training time (the epochs'
seconds in `metrics.jsonl`, evaluation and set-up excluded) and its throughput, split as
`training_speed` says: the first epoch's seconds apart (it pays one-off costs a longer run
does not pay again: first calls, compilation on a fresh machine) and the steady rate, images
per second over the later epochs. A base-to-new run gets base / new / H for both (zero-shot
CLIP on the base and on the new classes, as CoCoOp's tables), in a table of its own. Each row
is labelled by its method and what sets it apart from the other runs compared (`row_labels`:
`cavpt (variant=released)`), so an ablation's rows are never look-alikes. The demo's last
step; it works for any runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.viz.curves import flatten, read_metrics
from fastprompt.viz.runs import load_run

B2N = ("base", "new", "H")
# identity fields never shown in a label: the method (always shown), and facts that follow from the
# others (class names from data and classes, weights from clip/pretrained/seed, the data's content
# id, the identity hash)
_UNLABELLED = ("method", "classnames", "weights_id", "data_id", "identity_hash")


@dataclass(frozen=True)
class Comparison:
    run: str
    method: str
    label: str  # the method and what differs from the other runs compared
    classes: str  # "all", or "base" (base-to-new)
    zero_shot: dict  # %: {"acc": x}, or {"base": x, "new": y, "H": z}
    trained: dict  # %: the same keys
    train_seconds: float  # every epoch
    images_per_s: float  # over every epoch, the first included
    first_epoch_seconds: float
    steady_images_per_s: Optional[float]  # over epochs 2..N; None for a one-epoch run

    @property
    def zero_shot_accuracy(self) -> Optional[float]:
        return self.zero_shot.get("acc")

    @property
    def trained_accuracy(self) -> Optional[float]:
        return self.trained.get("acc")

    @property
    def gain(self) -> float:
        """Trained minus zero-shot accuracy in points (of H for base-to-new)."""
        key = "H" if self.classes == "base" else "acc"
        return self.trained[key] - self.zero_shot[key]

    def to_dict(self) -> dict:
        out = {"run": self.run, "method": self.method, "label": self.label, "classes": self.classes}
        if self.classes == "base":
            out.update({f"zero_shot_{k}": v for k, v in self.zero_shot.items()})
            out.update({f"trained_{k}": v for k, v in self.trained.items()})
        else:
            out.update(zero_shot_accuracy=self.zero_shot_accuracy, trained_accuracy=self.trained_accuracy)
        return {**out, "gain": self.gain, "train_seconds": self.train_seconds, "images_per_s": self.images_per_s,
                "first_epoch_seconds": self.first_epoch_seconds, "steady_images_per_s": self.steady_images_per_s}


def _shown(key: str, value) -> str:
    if key == "data" and isinstance(value, str):
        return f"{key}={Path(value).name}"
    if isinstance(value, (list, tuple)):
        value = " | ".join(map(str, value))
    return f"{key}={value}"


def row_labels(configs: list[dict]) -> list[str]:
    """A label per run config: its method, then each identity field whose value is not the same in
    every run compared; a field that belongs to the method (its options, its groups' lr and
    warm-up: `identity.FOLLOWS`) counts only among the runs of that method
    (`cavpt (variant=released)`, `coop (lr=0.01, seed=2)`)."""
    from fastprompt.training.identity import FOLLOWS, identity

    idents = [identity({**c, "options": c.get("options") or {}}) for c in configs]
    flat = [flatten({k: v for k, v in i.items() if k not in _UNLABELLED}, ".") for i in idents]
    keys = sorted(dict.fromkeys(k for f in flat for k in f), key=lambda k: not k.startswith("options."))
    labels = []
    for ident, fields in zip(idents, flat):
        parts, shown = [], {}
        for key in keys:
            per_method = "method" in FOLLOWS.get(key.split(".")[0], ())
            peers = [f for f, i in zip(flat, idents) if not per_method or i["method"] == ident["method"]]
            if key not in fields or len({repr(f.get(key, "<unset>")) for f in peers}) == 1:
                continue
            if key.startswith("options."):
                option = key.removeprefix("options.")
                if shown and _resolves_to(ident["method"], shown, option, fields[key]):
                    continue  # what the options shown already decide (CAVPT's variant: its aux_target)
                shown[option] = fields[key]
            parts.append(_shown(key.removeprefix("options."), fields[key]))
        labels.append(f"{ident['method']} ({', '.join(parts)})" if parts else str(ident["method"]))
    return labels


def _resolves_to(method: str, given: dict, option: str, value) -> bool:
    """Whether `method`'s options resolve `option` to `value` from `given` alone."""
    from fastprompt.methods import method_config

    try:
        return method_config(method, **given).to_dict().get(option, "<unset>") == value
    except (FastpromptError, TypeError):  # a method or option this version lacks: show it
        return False


def _trained(run: Path) -> tuple[str, dict]:
    """(classes, {metric: %}) of a finished run's results.json."""
    from fastprompt.sweep.report import read_results
    from fastprompt.training.runfiles import harmonic_mean

    path = run / "results.json"
    if not path.is_file():
        raise FastpromptError(f"{run} has no results.json; pass the --out of a finished `fastprompt train`")
    results = read_results(path)
    if results["classes"] == "base":
        base, new = float(results["base_accuracy"]), float(results["new_accuracy"])
        return "base", {"base": base, "new": new, "H": harmonic_mean(base, new)}
    return "all", {"acc": float(results["test_accuracy"])}


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
    from fastprompt.training.evaluate import evaluate, model_for_classes
    from fastprompt.training.runfiles import harmonic_mean

    if not run_dirs:
        raise FastpromptError("give at least one run directory")
    trained = [_trained(Path(r)) for r in run_dirs]  # every results.json checked before a model loads
    zero_shot: dict[tuple, dict] = {}
    runs = []
    for run_dir, (classes, accuracy) in zip(run_dirs, trained):
        path = Path(run_dir)
        run = load_run(run_dir, device=device)
        c = run.config
        key = (c["data"], c["clip"], c["pretrained"], tuple(run.model.templates), run.classes, c["weights_id"])
        if key not in zero_shot:
            model = run.zero_shot()
            score = lambda m, cls: evaluate(m, run.data, "test", cls, device=run.device, num_workers=num_workers)
            if classes == "base":  # zero-shot CLIP on the base classes, and on the new ones (CoCoOp Table 1)
                base = score(model, "base")
                new = score(model_for_classes(model, run.data.classnames_for("new")), "new")
                zero_shot[key] = {"base": base, "new": new, "H": harmonic_mean(base, new)}
            else:
                zero_shot[key] = {"acc": score(model, "all")}
        speed = training_speed(read_metrics(path / "metrics.jsonl"))
        runs.append((str(path), run.method, run.config, classes, zero_shot[key], accuracy, speed))
    labels = row_labels([r[2] for r in runs])
    return [Comparison(run=p, method=m, label=label, classes=cls, zero_shot=zs, trained=tr, **speed)
            for (p, m, _, cls, zs, tr, speed), label in zip(runs, labels)]


def comparison_tables(rows: list[Comparison]) -> list:
    """Rich Tables: the runs on all classes (zero-shot %, trained %, gain, train time, first epoch,
    steady images/s), then the base-to-new runs (zero-shot and trained base / new / H, the gain
    in H, ...)."""
    from rich.table import Table

    tables = []
    plain = [r for r in rows if r.classes != "base"]
    if plain:
        table = Table(title="zero-shot CLIP -> prompt-tuned, test accuracy", caption=SPEED_CAPTION)
        for name in ("method", "zero-shot", "trained", "gain", "train time", "first epoch", "images/s"):
            table.add_column(name, justify="left" if name == "method" else "right")
        for r in plain:
            table.add_row(r.label, f"{r.zero_shot_accuracy:.1f} %", f"{r.trained_accuracy:.1f} %", f"{r.gain:+.1f} pts",
                          *_speed_cells(r))
        tables.append(table)
    b2n = [r for r in rows if r.classes == "base"]
    if b2n:
        table = Table(title="zero-shot CLIP -> prompt-tuned, base-to-new test accuracy (H: harmonic mean)",
                      caption=SPEED_CAPTION)
        heads = ["method", *(f"zero-shot {m}" for m in B2N), *(f"trained {m}" for m in B2N), "gain H", "train time",
                 "first epoch", "images/s"]
        for name in heads:
            table.add_column(name, justify="left" if name == "method" else "right")
        for r in b2n:
            table.add_row(r.label, *(f"{r.zero_shot[m]:.1f} %" for m in B2N), *(f"{r.trained[m]:.1f} %" for m in B2N),
                          f"{r.gain:+.1f} pts", *_speed_cells(r))
        tables.append(table)
    return tables


SPEED_CAPTION = "train time: the epochs alone; images/s: epochs 2..N (the first epoch's one-off costs apart)"


def _speed_cells(r: Comparison) -> tuple[str, str, str]:
    steady = "-" if r.steady_images_per_s is None else f"{r.steady_images_per_s:.0f}"
    return f"{r.train_seconds:.1f} s", f"{r.first_epoch_seconds:.1f} s", steady
