#!/usr/bin/env bash
# One command: set this machine up (scripts/setup.sh) and run the whole CPU test suite.
# Triton kernels run in interpreter mode on a machine without CUDA (set in tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One pytest-xdist worker per core (at most 8), tests handed out one by one and stolen by an idle
# worker (`--dist worksteal`: 4 min 42 s against 5 min 27 s for whole files per worker on 2 cores,
# BENCHMARKS.md; a file's module fixtures may then be built on each worker, files built once per
# session go through `build_once`). `-n 0` after the command runs everything in this process.
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 8 --dist worksteal "$@"
