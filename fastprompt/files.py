"""fastprompt's files: its cache folder, and writing so that a reader never sees half a file
(a temporary file in the same folder, then an atomic rename), for checkpoints, run outputs,
caches and the demo CLIP."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union


def cache_dir() -> Path:
    """fastprompt's cache folder: `$FASTPROMPT_CACHE`, else `$XDG_CACHE_HOME/fastprompt` or
    `~/.cache/fastprompt` (hand-crafted features, image features, compiled code)."""
    root = os.environ.get("FASTPROMPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastprompt"
    )
    return Path(root)


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`; on any
    failure the temporary file is removed and the error raised. The folder must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Union[str, Path], obj: Any) -> None:
    """`obj` as indented JSON with a final newline, written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)
