"""The run directory rule: a directory holds one run, of one setting, written by one process.

- Identity: `config.json` holds the resolved config, its run facts and `identity_hash`; a
  command whose resolved settings differ from it in any identity field
  (`fastprompt.training.identity`) stops before anything is written, naming the first
  differing field and both values. `--restart` replaces the run (its files are removed
  first); `--resume` insists on continuing one. By default the same setting continues:
  a finished run says where its results are, a stopped one resumes from its checkpoint,
  one stopped before its first checkpoint starts again.
- Whole: starting (again) from epoch 0 removes every file of an earlier run (`RUN_FILES`,
  `RUN_GLOBS`) first, so no results.json or prompts of another run stay beside a new
  config.json; temporary files of an interrupted atomic write are removed at every start.
- One writer: `RunLock` holds an OS lock (fcntl.flock) on `DIR/.lock` for the run's life;
  the kernel drops it when the process dies, however it dies. A second process on the same
  directory stops at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Union

from fastprompt.errors import FastpromptError
from fastprompt.files import FolderLock, path_component

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG = "config.json"
RESULTS = "results.json"
# the files a run writes (the lock file stays: another process may be waiting on it)
RUN_FILES = ("config.json", "fewshot.json", "metrics.jsonl", "checkpoint.json", "prompts.safetensors", "results.json",
             "error.json", "checkpoint.pt")
RUN_GLOBS = ("checkpoint-*.safetensors", "eval-*.json", ".*.tmp")
RUN_FOLDERS = ("tensorboard",)
MODES = ("auto", "resume", "restart")


def default_run_dir(config) -> str:
    """`runs/METHOD-DATA-Kshot-seedS-CLIP-WEIGHTS-HASH` for a `TrainConfig`: the weights (tag,
    file name, or `random`) and the short hash of the resolved identity, so another setting
    never lands in this one's directory."""
    import re

    from fastprompt.training.identity import identity_hash, planned

    plan = planned(config)
    weights = "random" if plan.pretrained is None else Path(plan.pretrained).stem if os.path.isfile(plan.pretrained) \
        else plan.pretrained
    name = (f"{config.method}-{Path(config.data).stem}-{config.shots or 'all'}shot-seed{config.seed}-{config.clip}-{weights}-"
            f"{identity_hash(plan.to_dict())[:8]}")
    return str(Path("runs") / re.sub(r"[^A-Za-z0-9._+-]", "_", name))


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


def read_config(out: Path) -> Optional[dict]:
    """`out/config.json` as a dict; None when absent; FastpromptError saying what to do when garbage."""
    path = Path(out) / CONFIG
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise FastpromptError(f"{path} is unreadable ({err}); pass --restart to train this run again from the start, "
                              "or use another --out") from None
    return saved


def check_same_run(out: Path, expected: dict, saved: dict, both: bool = False) -> None:
    """FastpromptError naming the first identity field where `saved` (config.json) differs from
    `expected` (this command's resolved config)."""
    from fastprompt.training.identity import first_difference

    diff = first_difference(expected, saved, both=both)
    if diff is not None:
        key, mine, theirs = diff
        fix = "pass --restart to replace that run, or use another --out"
        if key == "autocast":  # the same --precision auto on another kind of device
            device = "cuda" if theirs == "bf16" else "cpu"
            fix = f"continue it on a {device} device (--precision auto is bf16 on cuda, fp32 on cpu), or {fix}"
        raise FastpromptError(f"--out {out} holds a run with {key}={theirs!r}, this command has {key}={mine!r}; {fix}")


def clear(out: Path) -> None:
    """Remove every file an earlier run left in `out` (not the lock, not foreign files)."""
    out = Path(out)
    paths = [out / name for name in RUN_FILES] + [p for pattern in RUN_GLOBS for p in out.glob(pattern)]
    for path in paths + [out / name for name in RUN_FOLDERS]:
        try:
            if path.is_dir() and path.name in RUN_FOLDERS:
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as err:
            raise FastpromptError(f"cannot remove {path}, left by an earlier run ({err.strerror}); remove it by hand, "
                                  "or use another --out") from None


def clean_temporaries(out: Path) -> None:
    """Remove the temporary files of atomic writes a killed process left (`.NAME.*.tmp`)."""
    for path in Path(out).glob(".*.tmp"):
        log.info("removing %s, left by an interrupted write", path)
        path.unlink(missing_ok=True)


def finished_results(out: Path) -> Optional[dict]:
    """results.json of a finished run in `out` (None when it has none or it is unreadable)."""
    try:
        results = json.loads((Path(out) / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


class RunLock(FolderLock):
    """The run directory's lock: `DIR/.lock` for as long as the run works on DIR (`FolderLock`).
    Re-entrant in one process (a sweep cell holds it around training and its evaluations); a
    second process gets FastpromptError at once, naming the holder's pid. A sweep holds the same
    lock on its own folder."""

    def __init__(self, out: Path):
        super().__init__(out, LOCK_FILE, busy=f"another process is running in {out}")
        self.out = Path(out)


def provenance() -> dict:
    """Package versions (fastprompt, torch, open_clip, triton; None when not installed) and the
    git commit of fastprompt's checkout when it is one (absent otherwise)."""
    import subprocess
    from importlib import metadata

    import fastprompt

    versions = {}
    for name, dist in (("fastprompt", None), ("torch", "torch"), ("open_clip", "open_clip_torch"), ("triton", "triton")):
        if dist is None:
            versions[name] = fastprompt.__version__
            continue
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    record = {"versions": versions}
    source = Path(fastprompt.__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return record
    lines = done.stdout.split()
    # only fastprompt's own checkout (not a repository that happens to hold an installed copy)
    if done.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == source:
        record["git_commit"] = lines[1]
    return record

