"""The built wheel works on its own: `fastprompt bench` with its default variants (the
anchor-style baseline included, which once loaded `benchmarks/anchor.py` by file path and
so failed outside a source checkout) from an install of the wheel alone.

The wheel is built from a copy of the package sources (pyproject.toml, README.md,
fastprompt/) so that no `build/` folder lands in the source tree. Build backend: this
interpreter's setuptools where it can build wheels by itself (>= 70.1, as in the project's
venv; no network), else pip's isolated build, which fetches `build-system.requires` from PyPI.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fastprompt.bench import VARIANTS

ROOT = Path(__file__).resolve().parents[1]


def _local_setuptools_builds_wheels() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)  # bdist_wheel moved into setuptools in 70.1


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fastprompt", src / "fastprompt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    isolation = ["--no-build-isolation"] if _local_setuptools_builds_wheels() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(dist), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("fastprompt-*.whl")
    return wheel


@pytest.mark.slow
def test_installed_wheel_runs_bench_with_every_variant(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"fastprompt/models/configs/{p.name}" for p in (ROOT / "fastprompt/models/configs").glob("*.json")}
    assert "fastprompt/models/configs/fastprompt-tiny.json" in configs and configs <= names  # package data ships
    tables = {f"fastprompt/reproduce/tables/{p.name}" for p in (ROOT / "fastprompt/reproduce/tables").glob("*.toml")}
    assert "fastprompt/reproduce/tables/cavpt-table1.toml" in tables and tables <= names  # the reproduce tables ship
    assert "fastprompt/bench/anchor.py" in names
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"  # cwd: the source tree must not be importable from here
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import fastprompt; print(fastprompt.__file__)"], cwd=elsewhere,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).resolve() == (site / "fastprompt" / "__init__.py").resolve()

    out = tmp_path / "bench.json"
    run = subprocess.run(
        [str(site / "bin" / "fastprompt"), "bench", "--clip", "fastprompt-tiny", "--device", "cpu", "--batch-size", "2",
         "--classes", "3", "--methods", "coop-text", "--variants", ",".join(VARIANTS), "--steps", "1", "--warmup", "0",
         "--json", str(out)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    records = json.loads(out.read_text())
    assert [r["variant"] for r in records] == list(VARIANTS)  # all four
    assert all(r["commit"] is None for r in records)  # installed from a wheel: no git checkout to name
    for r in records:
        assert "error" not in r, r
        assert r["method"] == "coop-text" and r["clip"] == "fastprompt-tiny" and r["images_per_s"] > 0
