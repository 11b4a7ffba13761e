"""Install what was tested (issue 21 §1): `scripts/setup.sh` installs `constraints.txt`, which pins
every dependency pyproject.toml names, each pin inside pyproject's range, and the suite runs on
exactly those versions (a new release of a dependency changes nothing until
`scripts/update-constraints.sh` rewrites the file after a green suite)."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = match.group(2)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in names]


def test_constraints_pin_every_dependency_inside_pyprojects_range():
    pins = _pins()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {req.name}: run scripts/update-constraints.sh"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}"


def test_the_suite_runs_on_the_pinned_versions():
    pins = _pins()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        installed = metadata.version(req.name)
        assert installed == pins[canonicalize_name(req.name)], \
            f"{req.name} {installed} is installed, constraints.txt pins {pins[canonicalize_name(req.name)]}: run scripts/setup.sh"


def test_setup_installs_the_constraints():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    installs = [line for line in setup.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert "constraints.txt" in setup.split("want=", 1)[1].splitlines()[0]  # a changed pin reinstalls
