#!/usr/bin/env bash
# One command: set this machine up (scripts/setup.sh) and run the whole CPU test suite.
# Triton kernels run in interpreter mode on a machine without CUDA (set in tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
