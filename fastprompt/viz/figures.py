"""Shared figure plumbing: the Agg backend, fixed pixel sizes, PNG or PDF, atomic writes."""

from __future__ import annotations

from pathlib import Path

from fastprompt.errors import FastpromptError
from fastprompt.files import atomic_write

FORMATS = ("png", "pdf")
DPI = 100  # figure inches x DPI = PNG pixels (no tight bounding box, so sizes are exact)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FastpromptError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}; pick png (default) or pdf")
    return fmt


def figures_dir(run: Path, out: str | None) -> Path:
    """Where a run's figures go: `out`, or RUN/figures; created, and checked writable."""
    folder = Path(out) if out else run / "figures"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise FastpromptError(f"cannot write figures to {folder} ({err.strerror}); pass a writable --out") from None
    return folder


def save_figure(fig, folder: Path, stem: str, fmt: str) -> Path:
    """Write `fig` as folder/stem.fmt (atomically) at DPI, close it and return the path."""
    path = folder / f"{stem}.{check_format(fmt)}"
    plt = pyplot()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))
        path.chmod(0o644)  # a figure is for sharing (the temporary file was private)
    finally:
        plt.close(fig)
    return path
