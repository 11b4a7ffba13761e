"""The run directory rule: a directory holds one run, of one setting, written by one process.

- Identity: `config.json` holds the resolved config, its run facts (the data's content, by
  the checksum its sidecar recorded, among them) and `identity_hash`; a
  command whose resolved settings differ from it in any identity field
  (`fastprompt.training.identity`) stops before anything is written, naming the first
  differing field and both values. `--restart` replaces the run (its files are removed
  first); `--resume` insists on continuing one. By default the same setting continues:
  a finished run says where its results are, a stopped one resumes from its checkpoint,
  one stopped before its first checkpoint starts again.
- Whole: starting (again) from epoch 0 removes every file of an earlier run (`RUN_FILES`,
  `RUN_GLOBS`, `RUN_FOLDERS`) first, so no results.json or prompts of another run stay beside a new
  config.json; temporary files of an interrupted atomic write are removed at every start.
- Only a run's own files: `check_out` refuses, before anything is written or removed, an
  `--out` that is empty text, the filesystem root, the home folder or the current folder,
  and a folder that holds files but no fastprompt run (`holds_run`: a config.json or a
  checkpoint.json that fastprompt wrote), in every mode, `--restart` included. A folder
  that holds only what a run leaves before its config.json (the lock, temporaries of its
  atomic writes, a sweep cell's error.json) is taken as empty: such a run starts again.
  Removing never touches a name that is not a run's.
- One writer: `RunLock` holds an OS lock (fcntl.flock) on `DIR/.lock` for the run's life;
  the kernel drops it when the process dies, however it dies. A second process on the same
  directory stops at once.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.files import FolderLock

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG = "config.json"
RESULTS = "results.json"
# the files a run writes (the lock file stays: another process may be waiting on it)
RUN_FILES = ("config.json", "fewshot.json", "metrics.jsonl", "checkpoint.json", "prompts.safetensors", "results.json",
             "error.json", "checkpoint.pt")
RUN_GLOBS = ("checkpoint-*.safetensors", "eval-*.json")
RUN_FOLDERS = ("tensorboard",)
MODES = ("auto", "resume", "restart")
# keys of a config.json that fastprompt wrote: TrainConfig fields and run facts every version has recorded
CONFIG_KEYS = ("method", "data", "clip", "pretrained", "seed", "options", "classnames", "template", "weights_id")
# keys of a checkpoint.json that fastprompt wrote (fastprompt.training.checkpoint.save)
CHECKPOINT_KEYS = ("format", "tensors", "checkpoint_id", "config", "epoch")
# keys of a sweep cell's error.json (fastprompt.sweep.worker), which a cell that failed before its config.json leaves
ERROR_KEYS = ("cell", "error")


def read_config(out: Path) -> Optional[dict]:
    """`out/config.json` checked (`read_run_config`); None when absent; FastpromptError saying what
    to do when garbage."""
    if not (Path(out) / CONFIG).is_file():
        return None
    from fastprompt.training.runfiles import read_run_config

    fix = "pass --restart to train this run again from the start, or use another --out"
    return read_run_config(out, needed=(), fix=fix)


def check_same_run(out: Path, expected: dict, saved: dict, both: bool = False) -> None:
    """FastpromptError naming the first identity field where `saved` (config.json) differs from
    `expected` (this command's resolved config)."""
    from fastprompt.training.identity import first_difference

    diff = first_difference(expected, saved, both=both)
    if diff is not None:
        key, mine, theirs = diff
        fix = f"{changed_fact(key, expected.get('data'))}pass --restart to replace that run, or use another --out"
        if key == "autocast":  # the same --precision auto on another kind of device
            device = "cuda" if theirs == "bf16" else "cpu"
            fix = f"continue it on a {device} device (--precision auto is bf16 on cuda, fp32 on cpu), or {fix}"
        raise FastpromptError(f"--out {out} holds a run with {key}={theirs!r}, this command has {key}={mine!r}; {fix}")


def _run_file_name(name: str) -> bool:
    """Whether `name` is a file a run writes (`RUN_FILES`, `RUN_GLOBS`)."""
    return name in RUN_FILES or any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_GLOBS)


def _is_temporary(name: str) -> bool:
    """Whether `name` is the temporary file `.NAME.XXXXXXXX.tmp` of an atomic write of a run file
    (`fastprompt.files.atomic_write`)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return _run_file_name(name[1:-len(".tmp")].rpartition(".")[0])  # mkstemp's random part holds no dot


def _json_with(path: Path, keys: tuple[str, ...]) -> bool:
    """Whether `path` is a JSON object holding every one of `keys`."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, a folder, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


def holds_run(out: Path) -> bool:
    """Whether `out` holds a fastprompt run: a config.json that fastprompt wrote (`CONFIG_KEYS`),
    or a checkpoint.json that it wrote (a run whose config.json is lost or damaged continues
    from it). A file of that name from another program is not one."""
    out = Path(out)
    return _json_with(out / CONFIG, CONFIG_KEYS) or _json_with(out / "checkpoint.json", CHECKPOINT_KEYS)


def check_out(out) -> None:
    """FastpromptError, before anything is written or removed, unless `out` may be a run
    directory: not empty text; not the filesystem root, the home folder or the current folder
    (a run removes its files there, and its folder is the run); absent, or holding a
    fastprompt run (`holds_run`), or holding only what a run leaves before its config.json
    (the lock, temporaries of a run file, a sweep cell's error.json). A folder with other
    files and no run is refused in every mode: --restart removes runs, never other files."""
    text = str(out)
    if not text.strip():
        raise FastpromptError(f"--out {text!r} names no folder; pass a run directory, e.g. --out runs/NAME, or leave "
                              "--out out for a default one under runs/")
    path = Path(out)
    where = path.resolve()  # links followed: a link to / is /
    for special, what in ((Path(where.anchor), "the filesystem root"),
                          (Path(os.path.expanduser("~")).resolve(), "your home folder"), (_cwd(), "the current folder")):
        if where == special:
            raise FastpromptError(f"--out {text} is {what}; a run needs a folder of its own, e.g. --out runs/NAME")
    if not path.is_dir() or holds_run(path):
        return  # absent (the lock makes it), or not a folder (the lock says it cannot write there)
    try:
        names = sorted(entry.name for entry in path.iterdir())
    except OSError as err:
        raise FastpromptError(f"cannot read --out {text} ({err.strerror}); pick a readable, writable directory") from None
    others = [name for name in names if not (name == LOCK_FILE or _is_temporary(name)
                                             or (name == "error.json" and _json_with(path / name, ERROR_KEYS)))]
    if not others:
        return  # a run stopped before its config.json was written (or an empty folder): it starts again
    if CONFIG in others:
        raise FastpromptError(f"--out {text} holds a config.json that is not a fastprompt run's (unreadable, or another "
                              "program's) and no fastprompt checkpoint.json; nothing was changed: use another --out, or "
                              "remove the folder's files yourself if they are a damaged run")
    shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    raise FastpromptError(f"--out {text} is not empty ({shown}) and holds no fastprompt run (no config.json of one); "
                          "nothing was changed: pass a new or empty folder as --out")


def _cwd() -> Optional[Path]:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was removed
        return None


def changed_fact(key: str, data) -> str:
    """What a run fact that follows file contents means when it differs, and the way to continue
    the run (the start of a fix; "" for any other field)."""
    if key == "data_id":
        return (f"the content of {data} changed since that run (prepared again, or replaced): point --data at the data "
                "it trained on, or ")
    if key == "weights_id":
        return "the CLIP weights differ from those it trained with (a --pretrained file changed?): use those, or "
    return ""


def clear(out: Path) -> None:
    """Remove every file an earlier run left in `out` (not the lock, not foreign files)."""
    out = Path(out)
    paths = [out / name for name in RUN_FILES] + [p for pattern in RUN_GLOBS for p in out.glob(pattern)]
    paths += [p for p in out.glob(".*.tmp") if _is_temporary(p.name)]
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
    """Remove the temporary files of atomic writes of run files that a killed process left
    (`.NAME.*.tmp`, NAME a file of `RUN_FILES` or `RUN_GLOBS`)."""
    for path in [p for p in Path(out).glob(".*.tmp") if _is_temporary(p.name)]:
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

