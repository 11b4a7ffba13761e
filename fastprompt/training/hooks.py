"""The trainer's one test hook: an environment variable that makes a run stop at a
deterministic point, so a test can kill a run mid-epoch without watching the clock.
Unset (normal use), it does nothing.

`FASTPROMPT_TEST_EXIT_AFTER_STEP=N`: the process ends abruptly, `os._exit(EXIT_CODE)` (no
cleanup, no flush, no checkpoint: what a kill leaves), right after optimiser step N of the
run, counted from the run's first step over all epochs (a resumed run counts the epochs it
skipped). Used by tests/training/test_resume_ddp.py.
"""

from __future__ import annotations

import os

from fastprompt.errors import FastpromptError

EXIT_AFTER_STEP = "FASTPROMPT_TEST_EXIT_AFTER_STEP"
EXIT_CODE = 75  # what the killed process returns, so a test can tell the hook from a failure


def exit_after_step(step: int) -> None:
    """Called by the trainer after optimiser step `step` (1-based, whole run)."""
    value = os.environ.get(EXIT_AFTER_STEP)
    if value is None:
        return
    if not value.isdigit():
        raise FastpromptError(f"{EXIT_AFTER_STEP}={value!r} must be a step number; unset it outside the test suite")
    if step >= int(value):
        os._exit(EXIT_CODE)
