"""Where and how a run executes: device resolution, autocast, seeding, RNG state and worker
counts. One copy of each, used by the trainer, evaluation, bench and the data loaders."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from typing import Callable, Optional, Union

import logging

import numpy as np
import torch

# torch-free homes (the CLI checks a command line with them before torch loads), re-exported here
from fastprompt.settings import (DEVICES, PRECISIONS, SEED_MAX, available_cores, check_device_name,  # noqa: F401
                                 check_precision, resolve_workers)
from fastprompt.errors import FastpromptError
from fastprompt.validation import check_int

log = logging.getLogger(__name__)


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a device that exists here (FastpromptError otherwise).

    Under torchrun, plain `cuda` is this process's GPU (LOCAL_RANK)."""
    if isinstance(device, torch.device):
        device = str(device)
    check_device_name(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FastpromptError(f"device={device!r} but no CUDA device is visible here; use --device cpu or auto")
        if dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FastpromptError(f"device={device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def effective_precision(precision: str, device: torch.device) -> str:
    """What `precision` computes in on `device`: "bf16" (autocast) or "fp32". auto: bf16 on
    CUDA, fp32 elsewhere. A run records it (config.json's `autocast`): `auto` alone does not
    say which it was."""
    check_precision(precision)
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable:
    """A context-manager factory: bf16 autocast on CUDA by default (auto) or where asked;
    fp32 runs without autocast."""
    if effective_precision(precision, device) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy and torch (Dassl's `set_random_seed`)."""
    check_int("seed", seed, minimum=0, maximum=SEED_MAX)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a run draws from, for an exact resume."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


