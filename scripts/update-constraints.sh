#!/usr/bin/env bash
# Upgrades the pinned dependency versions deliberately: installs the newest versions that
# pyproject.toml allows into a scratch virtual environment, runs the whole test suite there,
# and rewrites constraints.txt only when the suite passes. Review `git diff constraints.txt`
# (and the release notes of what moved), then commit it; scripts/setup.sh installs it.
# Usage: bash scripts/update-constraints.sh [pytest args...]   (e.g. -x to stop at the first failure)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "[update-constraints] newest allowed versions into $scratch/venv"
"$PYTHON" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --upgrade pip
"$scratch/venv/bin/python" -m pip install -q -e ".[test]"
"$scratch/venv/bin/python" -m pip freeze --all --exclude-editable | grep -vi '^fastprompt' | sort -f > "$scratch/freeze.txt"
echo "[update-constraints] what would change:"
diff <(grep -v '^#' constraints.txt) "$scratch/freeze.txt" || true
echo "[update-constraints] running the suite on them"
"$scratch/venv/bin/python" -m pytest -q -n auto --maxprocesses 8 --dist worksteal "$@"
{
    echo "# The dependency versions the test suite last passed with ($("$scratch/venv/bin/python" -c 'import platform; print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")'), $(date -u +%F))."
    echo "# scripts/setup.sh installs exactly these (pip -c); upgrade them deliberately with"
    echo "# scripts/update-constraints.sh, which installs the newest versions pyproject.toml allows into a"
    echo "# scratch venv, runs the whole suite there and rewrites this file only when it passes."
    cat "$scratch/freeze.txt"
} > constraints.txt
# the editable install in the scratch venv pointed at this checkout; .venv is reinstalled by setup.sh (stamp changed)
echo "[update-constraints] constraints.txt rewritten; run scripts/setup.sh to install it into .venv, then commit it"
