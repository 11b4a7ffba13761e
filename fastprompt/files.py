"""fastprompt's files: its cache folder, writing so that a reader never sees half a file
(a temporary file in the same folder, then an atomic rename) for checkpoints, run outputs,
caches and the demo CLIP, and the one check of names from file contents that become paths
(`path_component`)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Union

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it and setting it back; under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def cache_dir() -> Path:
    """fastprompt's cache folder: `$FASTPROMPT_CACHE`, else `$XDG_CACHE_HOME/fastprompt` or
    `~/.cache/fastprompt` (hand-crafted features, image features, compiled code)."""
    root = os.environ.get("FASTPROMPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastprompt"
    )
    return Path(root)


def atomic_write(path: Union[str, Path], write: Callable[[str], None], kill_point: Optional[str] = None) -> None:
    """Call `write(tmp)` on a temporary file `.NAME.*.tmp` beside `path`, then rename it to
    `path`; on any failure the temporary file is removed and the error raised (a killed
    process leaves it: `fastprompt.training.rundir.clean_temporaries`). The file gets the
    permissions of a plain `open()` (0o666 less the umask), not mkstemp's 0o600. The folder
    must exist. `kill_point`: a test hook point just before the rename (training/hooks.py)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        if kill_point is not None:
            from fastprompt.training.hooks import kill_point as hook

            hook(kill_point)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Union[str, Path], obj: Any, kill_point: Optional[str] = None) -> None:
    """`obj` as indented JSON with a final newline, written atomically (`kill_point`: see atomic_write)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write, kill_point=kill_point)


def path_component(value: Any, what: str, fix: str) -> str:
    """`value` as one file or folder name that fastprompt builds a path from, when it comes from
    a file's contents (a sidecar's dataset name, a results.json's dataset, a run's method).

    A name that could reach outside the folder it is joined to, or hide in it, is refused with
    FastpromptError (`what` names where it came from, `fix` says what to do), never mapped to
    another name: a mapped name could land on another dataset's folder, and a sidecar holding
    such a name is damaged or hostile. Refused: not a string, empty, `.` or `..`, a path
    separator (`/`, `\\`), a leading `.`, control characters (NUL included), over 200 bytes
    (room for the prefixes and suffixes of the files named after it). Anything else is
    returned unchanged."""
    from fastprompt.errors import FastpromptError

    if not isinstance(value, str):
        reason = f"a {type(value).__name__}, not a string"
    elif not value:
        reason = "empty"
    elif "/" in value or "\\" in value:
        reason = "a path, not a name"
    elif value.startswith("."):
        reason = "it starts with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        reason = "it holds control characters"
    elif len(value.encode("utf-8", "surrogatepass")) > 200:
        reason = "longer than 200 bytes"
    else:
        return value
    raise FastpromptError(f"{what} {value!r} cannot name a file or folder ({reason}); {fix}")

