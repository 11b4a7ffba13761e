"""Finding image files in a dataset folder: links followed, loops cut, every file counted once.

Image folders often hold symbolic links (a class folder linked in from elsewhere, images
shared between datasets). `prepare` follows them, but a link back up the tree
(`cat/self -> .`) would make a walk revisit the same folder again and again (each image
stored dozens of times, spread over train, val and test), and two such links make a plain
`os.walk(followlinks=True)` run for ever. A `FileScan` identifies folders and files by their
resolved path (`os.path.realpath`): a folder is walked once, at the first path that reaches
it, and a file is counted once, under the first path it was found at (folders in sorted
order, depth first, so the choice is the same on every machine). What was left out is
logged once per scan.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable

from fastprompt.errors import FastpromptError

logger = logging.getLogger(__name__)


def _entries(folder: Path) -> list[os.DirEntry]:
    """`folder`'s entries sorted by name; FastpromptError naming the folder if it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as err:
        raise FastpromptError(f"cannot list folder {folder} ({err.strerror}); fix its permissions or remove it") from None


class FileScan:
    """One scan of a dataset folder: walks (`images_under`) and listings (`files_in`) that
    share one record of the folders walked and the files counted."""

    def __init__(self, root: Path, keep: Callable[[str], bool]):
        self.root = Path(root)
        self.keep = keep  # file name -> counted (e.g. an image extension, not hidden)
        self._dirs: set[str] = set()  # resolved folders already walked or claimed
        self._files: dict[str, str] = {}  # resolved file -> the path (relative to root) it was counted as
        self.repeated_files: list[tuple[str, str]] = []  # (path left out, the path it was counted as)
        self.repeated_dirs: list[str] = []  # linked folders not walked again (relative to root)

    def claim(self, folders: Iterable[Path]) -> None:
        """Mark `folders` (and the root) as owned: a walk that reaches one of them through a
        link does not enter it (its images are counted where it is walked itself). Two of them
        being the same folder is an error: one set of images would count for two classes."""
        seen: dict[str, Path] = {}
        for folder in folders:
            real = os.path.realpath(folder)
            if real in seen:
                raise FastpromptError(
                    f"{folder} and {seen[real]} are the same folder (one links to the other); "
                    "remove one, so its images belong to one class"
                )
            seen[real] = folder
        self._dirs.add(os.path.realpath(self.root))
        self._dirs.update(seen)

    def _count(self, path: str, real: str) -> bool:
        first = self._files.setdefault(real, path)
        if first != path:
            self.repeated_files.append((path, first))
            return False
        return True

    def images_under(self, folder: Path) -> list[str]:
        """Kept files under `folder`, recursively, as sorted POSIX paths relative to the root;
        hidden folders skipped, each folder walked once and each file counted once."""
        found: list[str] = []
        stack = [(Path(folder), os.path.realpath(folder))]  # (path, resolved path)
        self._dirs.add(stack[0][1])
        while stack:
            path, real = stack.pop()
            subdirs = []
            for entry in _entries(path):
                if entry.name.startswith("."):
                    continue
                rel = Path(entry.path).relative_to(self.root).as_posix()
                if entry.is_dir():  # follows links
                    sub_real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                    if sub_real in self._dirs:
                        self.repeated_dirs.append(rel)
                        continue
                    self._dirs.add(sub_real)
                    subdirs.append((Path(entry.path), sub_real))
                elif self.keep(entry.name):
                    file_real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                    if self._count(rel, file_real):
                        found.append(rel)
            stack.extend(reversed(subdirs))  # depth first, in sorted order
        return sorted(found)

    def files_in(self, folder: Path) -> list[str]:
        """Kept files directly in `folder` (no recursion), sorted by name, as POSIX paths
        relative to the root; each file counted once."""
        real = os.path.realpath(folder)
        found = []
        for entry in _entries(folder):
            if entry.name.startswith(".") or entry.is_dir() or not self.keep(entry.name):
                continue
            rel = Path(entry.path).relative_to(self.root).as_posix()
            if self._count(rel, os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)):
                found.append(rel)
        return found

    def log_repeats(self) -> None:
        """One warning naming what links made the scan leave out (nothing when nothing was)."""
        if self.repeated_dirs:
            logger.warning(
                "%s: %d linked folder(s) lead to a folder already scanned (a link loop or a second link to it) "
                "and were not scanned again, e.g. %s", self.root, len(self.repeated_dirs), self.repeated_dirs[0],
            )
        if self.repeated_files:
            path, first = self.repeated_files[0]
            logger.warning(
                "%s: %d image path(s) lead to a file already counted (links) and were left out, e.g. %s (same file as %s)",
                self.root, len(self.repeated_files), path, first,
            )
