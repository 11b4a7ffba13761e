"""The test hooks: environment variables that make a process end abruptly at a
deterministic point, so a test can kill a run (or a write) without watching the clock.
Unset (normal use), they do nothing. The process ends with `os._exit(EXIT_CODE)`: no
cleanup, no flush, no checkpoint, no lock release by Python (the kernel drops it): what a
SIGKILL leaves.

- `FASTPROMPT_TEST_EXIT_AFTER_STEP=N`: right after optimiser step N of the run, counted from
  the run's first step over all epochs (a resumed run counts the epochs it skipped).
- `FASTPROMPT_TEST_KILL_AT=POINT` or `POINT:K`: the K-th time (default 1) the process
  reaches the named point, one of `KILL_POINTS`:
  - `checkpoint-tensors`: a checkpoint's tensor file is committed, its checkpoint.json not yet;
  - `checkpoint-rename`: checkpoint.json's temporary file is complete, not yet renamed;
  - `metrics-append`: half of an epoch's metrics.jsonl line is written;
  - `before-results`: the last epoch is trained and checkpointed, results.json not written;
  - `beton-write`: a .beton and its sidecar are complete as temporary files, not renamed.
Used by tests/training/test_faults.py and tests/training/test_hooks.py.
"""

from __future__ import annotations

import os

from fastprompt.errors import FastpromptError

EXIT_AFTER_STEP = "FASTPROMPT_TEST_EXIT_AFTER_STEP"
KILL_AT = "FASTPROMPT_TEST_KILL_AT"
EXIT_CODE = 75  # what the killed process returns, so a test can tell the hook from a failure
KILL_POINTS = ("checkpoint-tensors", "checkpoint-rename", "metrics-append", "before-results", "beton-write")
_reached: dict[str, int] = {}


def exit_after_step(step: int) -> None:
    """Called by the trainer after optimiser step `step` (1-based, whole run)."""
    value = os.environ.get(EXIT_AFTER_STEP)
    if value is None:
        return
    if not value.isdigit():
        raise FastpromptError(f"{EXIT_AFTER_STEP}={value!r} must be a step number; unset it outside the test suite")
    if step >= int(value):
        os._exit(EXIT_CODE)


def kill_point(point: str) -> None:
    """Called where a kill would leave a half-done write; ends the process if `KILL_AT` names it."""
    value = os.environ.get(KILL_AT)
    if value is None:
        return
    name, _, count = value.partition(":")
    if name not in KILL_POINTS or (count and not count.isdigit()):
        raise FastpromptError(f"{KILL_AT}={value!r} must be POINT or POINT:K with POINT one of {', '.join(KILL_POINTS)}; "
                              "unset it outside the test suite")
    if point != name:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] >= int(count or 1):
        os._exit(EXIT_CODE)
