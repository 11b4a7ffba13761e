"""Run settings checked before torch loads: the values each setting takes and the worker count.

The CLI and the configs check a command line against these before torch is imported (a typo
is refused in well under a second, not after ~6 s and 1.1 GB of imports; the data layer
resolves its workers here for the same reason). The modules that implement each setting
import them from here: `fastprompt.runtime` (devices, precisions, seeds, workers),
`fastprompt.models.text` (text-tower backends), `fastprompt.models.vision` (where layer 1's
visual prompts enter)."""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.validation import is_int

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")  # plus cuda:N
PRECISIONS = ("auto", "fp32", "bf16")
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
BACKENDS = ("fast", "reference")  # the fast path, or the eager oracle computing the same function
PLACEMENTS = ("after-ln-pre", "before-ln-pre")  # layer 1's visual prompts: after ln_pre (fanrena/DPT) or before (MaPLe)


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: Optional[int], what: str = "workers") -> int:
    """`workers` clamped to the available cores; None means all of them."""
    cores = available_cores()
    if workers is None:
        return cores
    if not is_int(workers) or workers < 1:
        raise FastpromptError(f"{what}={workers!r} must be a positive integer (or left out to use all {cores} cores)")
    if workers > cores:
        log.info("%s=%d clamped to the %d available cores", what, workers, cores)
    return min(int(workers), cores)


def check_device_name(device: str) -> None:
    """auto, cpu, cuda or cuda:N (whether it exists here: `fastprompt.runtime.resolve_device`)."""
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise FastpromptError(f"device={device!r} is not known; use auto, cpu, cuda or cuda:N")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise FastpromptError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
