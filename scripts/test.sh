#!/usr/bin/env bash
# One command: set this machine up (scripts/setup.sh) and run the whole CPU test suite.
# Triton kernels run in interpreter mode on a machine without CUDA (set in tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One pytest-xdist worker per core (at most 8); a test file stays on one worker, so its module
# fixtures are built once. `-n 0` after the command runs everything in this process.
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 8 --dist loadfile "$@"
