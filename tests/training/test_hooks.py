"""The trainer's test hook (fastprompt/training/hooks.py): inert when unset, refuses a bad
value; its exit is exercised by tests/training/test_faults.py."""

import subprocess
import sys

import pytest

from fastprompt.errors import FastpromptError
from fastprompt.training.hooks import EXIT_AFTER_STEP, EXIT_CODE, exit_after_step


def test_unset_hook_does_nothing(monkeypatch):
    monkeypatch.delenv(EXIT_AFTER_STEP, raising=False)
    exit_after_step(10**9)


def test_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(EXIT_AFTER_STEP, "three")
    with pytest.raises(FastpromptError, match=f"{EXIT_AFTER_STEP}='three' must be a step number"):
        exit_after_step(1)


@pytest.mark.slow
def test_exits_at_the_step_and_not_before():
    code = ("from fastprompt.training.hooks import exit_after_step\n"
            "for step in range(1, 10):\n    print(step, flush=True)\n    exit_after_step(step)\n")
    run = subprocess.run([sys.executable, "-c", code], env={EXIT_AFTER_STEP: "3", "PATH": ""}, capture_output=True,
                         text=True)
    assert run.returncode == EXIT_CODE and run.stdout.split() == ["1", "2", "3"]
