"""fastprompt's files: its cache folder, writing so that a reader never sees half a file
(a temporary file in the same folder, then an atomic rename) for checkpoints, run outputs,
caches and the demo CLIP, the one-writer lock of a folder or output (`FolderLock`), and the
one check of names from file contents that become paths (`path_component`)."""

from __future__ import annotations

import fcntl
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


def write_json(path: Union[str, Path], obj: Any, kill_point: Optional[str] = None, *, indent: Optional[int] = 2) -> None:
    """`obj` as JSON with a final newline, written atomically (`kill_point`: see atomic_write).
    indent None: one line, by the json module's C encoder (an indented dump is pure Python: a
    checkpoint record's RNG states, thousands of numbers, took ~10 ms a save indented)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n", kill_point=kill_point)


def write_text(path: Union[str, Path], text: str, kill_point: Optional[str] = None) -> None:
    """`text` (UTF-8) written atomically (`kill_point`: see atomic_write)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

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


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (innermost first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: something was written


class FolderLock:
    """An exclusive OS lock (fcntl.flock) on `FOLDER/NAME` for as long as one process works on
    what it guards (a run directory, a sweep's folder, a .beton being written). Re-entrant in
    one process; a second process gets FastpromptError at once, naming the holder's pid (the
    holder writes it into the lock file). The kernel releases the lock when the process ends,
    however it ends (and not before every process that inherited it by fork has ended: a
    writer child still alive keeps its output locked). A clean release also removes the lock
    file (and the folders the lock made, if nothing else was written in them), after
    checking at acquire time that the locked file is still the one at the path (so removing
    it never lets two processes in).

    `busy`: what the refusal says is going on (e.g. "another process is running in runs/x");
    `target`: the --out the user gave, named when the folder cannot be written."""

    _held: dict[str, list] = {}  # resolved lock path -> [open file, count, folders this lock created]

    def __init__(self, folder: Union[str, Path], name: str, busy: str, target: Optional[str] = None):
        self.folder, self.name, self.busy = Path(folder), name, busy
        self.target = str(folder) if target is None else target
        self.key: Optional[str] = None

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def holder(self) -> Optional[int]:
        """The pid the holder wrote into the lock file (None when unreadable)."""
        try:
            text = self.path.read_text().split()
        except OSError:
            return None
        return int(text[0]) if text and text[0].isdigit() else None

    def acquire(self) -> "FolderLock":
        from fastprompt.errors import FastpromptError

        key = str(self.path.resolve())
        if key in self._held:
            self._held[key][1] += 1
            self.key = key
            return self
        created = [d for d in [self.folder, *self.folder.parents] if not d.exists()]
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a")
            except OSError as err:
                _remove_empty(created)
                raise FastpromptError(f"cannot write to --out {self.target} ({err.strerror}); pick a writable "
                                      "directory") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                _remove_empty(created)
                pid = self.holder()
                held = f"pid {pid} holds {self.path}" if pid is not None else f"{self.path} is locked"
                raise FastpromptError(f"{self.busy} ({held}); wait for it to end, or use another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # the holder removed the file between our open and our lock: lock the new one
        try:
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")  # who holds it, for the refusal of a second process
            handle.flush()
        except OSError:
            pass  # a full disk: the lock holds without the pid
        self._held[key] = [handle, 1, created]
        self.key = key
        return self

    def release(self) -> None:
        if self.key is None:
            return
        entry = self._held[self.key]
        entry[1] -= 1
        key, self.key = self.key, None
        if entry[1] > 0:
            return
        handle, _, created = self._held.pop(key)
        try:
            self.path.unlink(missing_ok=True)  # still holding the lock: see acquire
        except OSError:
            pass
        handle.close()  # closing the descriptor drops the flock
        _remove_empty(created)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
