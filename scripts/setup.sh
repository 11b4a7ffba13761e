#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for fastprompt: the system libraries FFCV
# compiles against, a virtual environment in .venv, and the project with its test extras at
# the versions in constraints.txt (the ones the suite last passed with; a new release of a
# dependency never changes what this installs: scripts/update-constraints.sh upgrades them).
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES="pkg-config libturbojpeg0-dev libopencv-dev"

if ! (command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg && pkg-config --exists opencv4); then
    echo "[setup] installing system libraries for FFCV: $APT_PACKAGES"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $APT_PACKAGES >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

# The stamp holds a hash of pyproject.toml and constraints.txt: a changed dependency list or pin reinstalls.
stamp=.venv/.fastprompt-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import fastprompt" 2>/dev/null; then
    echo "[setup] installing fastprompt and its dependencies into .venv (first time: several GB for torch)"
    .venv/bin/python -m pip install -q --upgrade -c constraints.txt pip
    .venv/bin/python -m pip install -q -c constraints.txt --build-constraint constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/fastprompt --version)"
