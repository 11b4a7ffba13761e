"""A finished run's config.json read back: every reader (eval, compare, `fastprompt.load_run`,
report, a resumed train, a sweep's plan) goes through `read_run_config`, which checks each field
with `TrainConfig`'s own checks and the run facts' types, so a damaged or hand-edited file is one
line naming the file, the field and the fix, never a traceback further on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

from fastprompt.errors import FastpromptError
from fastprompt.files import path_component
from fastprompt.validation import json_type

CONFIG = "config.json"
CHECKPOINT = "checkpoint.json"  # a checkpoint's JSON record (`fastprompt.training.checkpoint`)

def eval_file(run: Path, dataset: str, data: Union[str, Path], classes: str) -> Path:
    """Where `fastprompt.training.evaluate_run` writes a run's result on `data`:
    `eval-DATASET-CLASSES.json`; when that file holds another data file's result,
    `eval-DATASET-HASH-CLASSES.json` (HASH of the data path), so two data files of one dataset
    name never overwrite each other. DATASET comes from the sidecar: a name that is not a plain
    file name is refused (`fastprompt.files.path_component`), never mapped."""
    safe = path_component(dataset, "dataset name", 'set the sidecar\'s "name" to a plain name such as "eurosat"')
    path = Path(run) / f"eval-{safe}-{classes}.json"
    data = str(Path(data).resolve())
    try:
        held = json.loads(path.read_text()).get("data") if path.is_file() else data
    except (OSError, ValueError, AttributeError):
        held = None
    if held is not None and str(Path(held).resolve()) == data:
        return path
    return Path(run) / f"eval-{safe}-{hashlib.sha256(data.encode()).hexdigest()[:8]}-{classes}.json"


def harmonic_mean(a: float, b: float) -> float:
    """results.json's `harmonic_mean` of the base and new accuracies (base-to-new), and report's H."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def class_results(confusion: list[list[int]], classnames: list[str]) -> dict:
    """An evaluation's numbers from its confusion matrix (K x K counts, rows: true class,
    columns: predicted; `classnames` in the same order): `accuracy` (%, every image),
    `mean_per_class_accuracy` (the mean over the classes with images, as Dassl's
    `TEST.PER_CLASS_RESULT` average in dassl/evaluation/evaluator.py), `per_class` (class name
    -> accuracy %, null for a class without images) and `confusion` itself."""
    totals = [sum(row) for row in confusion]
    per_class = {name: (100.0 * row[k] / total if total else None)
                 for k, (name, row, total) in enumerate(zip(classnames, confusion, totals))}
    scored = [acc for acc in per_class.values() if acc is not None]
    correct = sum(row[k] for k, row in enumerate(confusion))
    return {"accuracy": 100.0 * correct / max(sum(totals), 1),
            "mean_per_class_accuracy": sum(scored) / len(scored) if scored else 0.0,
            "per_class": per_class, "confusion": confusion}


# The run facts the trainer writes into config.json beside the TrainConfig fields
# (`Trainer._run_facts`), each with what it must be; `read_run_config` checks those present.
RUN_FACTS = {
    "classnames": ("a non-empty list of strings",
                   lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v)),
    "weights_id": ("a string", lambda v: isinstance(v, str)),
    "dataset": ("a string", lambda v: isinstance(v, str)),
    "data_id": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "image_size": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "autocast": ("'bf16' or 'fp32'", lambda v: v in ("bf16", "fp32")),
    "world_size": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "identity_hash": ("a string", lambda v: isinstance(v, str)),
}
# what rebuilding a finished run's model reads from config.json (`fastprompt.load_run`, eval, compare)
MODEL_KEYS = ("method", "data", "clip", "pretrained", "options", "classnames", "seed", "weights_id", "template")


def read_run_config(run: Path, needed: tuple[str, ...] = MODEL_KEYS, fix: Optional[str] = None) -> dict:
    """`run/config.json` read and checked field by field, as `TrainConfig` checks a config (the
    same code) plus the run facts (`RUN_FACTS`): a damaged or hand-edited file is one
    FastpromptError naming the file, the field and `fix`, never a traceback further on.
    `needed`: the keys the caller reads (a key of an earlier version's file may be absent)."""
    from fastprompt.training.config import TrainConfig

    path = Path(run) / CONFIG
    fix = fix or f"correct it, or train the run again with `fastprompt train ... --out {run} --restart`"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FastpromptError(f"{path} is unreadable ({_first_line(err)}); {fix}") from None
    if not isinstance(saved, dict):
        raise FastpromptError(f"{path} holds a JSON {json_type(saved)}, not a fastprompt run's config (an object); {fix}")
    missing = [k for k in needed if k not in saved]
    if missing:
        raise FastpromptError(f"{path} lacks {', '.join(missing)}: not a fastprompt run's config; {fix}")
    try:
        TrainConfig.from_dict({"out": str(run), **saved})
    except FastpromptError as err:
        raise FastpromptError(f"{path}: {err}; {fix}") from None
    for name, (what, ok) in RUN_FACTS.items():
        if name in saved and not ok(saved[name]):
            raise FastpromptError(f"{path}: {name}={saved[name]!r} must be {what}; {fix}")
    return saved


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def finished_run_config(run_dir: Path) -> dict:
    """A finished run's config.json, checked (`read_run_config`); a folder without config.json
    and prompts.safetensors is refused with the fix."""
    if not (run_dir / CONFIG).is_file() or not (run_dir / "prompts.safetensors").is_file():
        raise FastpromptError(
            f"{run_dir} is not a finished run (needs config.json and prompts.safetensors); pass the --out of a completed `fastprompt train`"
        )
    return read_run_config(run_dir)


def check_evaluation(run_dir: Union[str, Path], data: Union[str, Path], classes: str, device: str, precision: str) -> None:
    """`fastprompt.training.evaluate_run`'s bad-input checks, torch-free (the CLI runs them
    before importing torch): the device's name, the precision, the finished run, the data's
    sidecar and its classes."""
    from fastprompt.data.beton import open_dataset
    from fastprompt.settings import check_device_name, check_precision

    check_device_name(device)  # the arguments first: a bad --device or --precision reads nothing
    check_precision(precision)
    finished_run_config(Path(run_dir))
    open_dataset(data, tables=False).classnames_for(classes)  # the sidecar: torch-free (evaluate_run opens it whole)


def checkpoint_epoch(run: Path) -> Optional[int]:
    """The epochs a run's committed checkpoint holds (checkpoint.json's `epoch`), read from the
    JSON record alone (torch-free: a sweep's plan says where each cell resumes); None when
    there is no record or it is unreadable (the trainer's own check then names the problem)."""
    try:
        epoch = json.loads((Path(run) / CHECKPOINT).read_text()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None
