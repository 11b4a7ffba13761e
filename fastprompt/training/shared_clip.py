"""One frozen CLIP for the runs of a pack, each run's random streams left where its own build leaves them.

A solo run seeds its RNGs, builds its CLIP (open_clip initialises every weight at random before
the checkpoint overwrites it: draws from the global generator) and then draws its prompt init.
A packed run must draw the same init, so it must stand where the build leaves the generator;
building a CLIP per run only to drop it is most of a small pack's setup on a CPU.

`SharedClip.build` builds the first run's CLIP and records the random draws the build makes
(every aten op tagged `nondeterministic_seeded` that uses the default generator: its shape,
dtype and device, not its values). Each later run gets the same CLIP object and replays those
draws on empty tensors from its own seed: the generator advances as its own build would have
advanced it, at the cost of the draws alone. The replay is checked once, on the first run: from
the RNG state before its build, the recorded draws must leave every RNG (`runtime.rng_state`:
torch, CUDA, numpy, Python) bit-equal to where the build left it; when they do not (a build
that draws elsewhere), every run builds its own CLIP, as before, and that is logged once.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastprompt.models.clip import ClipBundle
from fastprompt.runtime import rng_state, set_rng_state

log = logging.getLogger(__name__)


class _Draw:
    """One recorded random op: the op, and its arguments with each tensor as (shape, dtype, device)."""

    def __init__(self, func, args: tuple, kwargs: dict):
        self.func = func
        self.args = tuple(_spec(a) for a in args)
        self.kwargs = {k: _spec(v) for k, v in kwargs.items()}

    def replay(self) -> None:
        self.func(*(_empty(a) for a in self.args), **{k: _empty(v) for k, v in self.kwargs.items()})


class _TensorSpec:
    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device = tuple(t.shape), t.dtype, t.device


def _spec(value):
    return _TensorSpec(value) if isinstance(value, torch.Tensor) else value


def _empty(value):
    return torch.empty(value.shape, dtype=value.dtype, device=value.device) if isinstance(value, _TensorSpec) else value


class RandomDraws(TorchDispatchMode):
    """Records the default generator's draws of the ops run under it (`with RandomDraws() as d:`)."""

    def __init__(self):
        super().__init__()
        self.draws: list[_Draw] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and kwargs.get("generator") is None:
            self.draws.append(_Draw(func, args, kwargs))
        return func(*args, **kwargs)

    def replay(self) -> None:
        """The recorded draws again, from the generators' current states (their values discarded)."""
        with torch.no_grad():
            for draw in self.draws:
                draw.replay()


def same_state(a: dict, b: dict) -> bool:
    """Whether two `runtime.rng_state()`s are bit-equal."""
    numpy_a, numpy_b = a["numpy"], b["numpy"]
    return (torch.equal(a["torch"], b["torch"]) and len(a["cuda"]) == len(b["cuda"])
            and all(torch.equal(x, y) for x, y in zip(a["cuda"], b["cuda"]))
            and numpy_a[0] == numpy_b[0] and np.array_equal(numpy_a[1], numpy_b[1]) and tuple(numpy_a[2:]) == tuple(numpy_b[2:])
            and a["python"] == b["python"])


class SharedClip:
    """The CLIP of a pack's runs, built once (module docstring). `build(make)` at the point where a
    solo run would call `make()` (after seeding its RNGs): the first call builds, later calls
    replay the first build's draws and return the same bundle."""

    def __init__(self):
        self.bundle: Optional[ClipBundle] = None
        self.draws: Optional[RandomDraws] = None
        self.exact = False  # the replay checked bit-equal on the first run

    def build(self, make: Callable[[], ClipBundle]) -> ClipBundle:
        if self.bundle is None:
            before = rng_state()
            with RandomDraws() as draws:
                bundle = make()
            after = rng_state()
            set_rng_state(before)
            draws.replay()
            self.exact = same_state(rng_state(), after)
            set_rng_state(after)
            if not self.exact:
                log.warning("replaying the CLIP build's %d random draws does not reproduce its RNG state; each packed "
                            "run builds its own CLIP (slower, same runs)", len(draws.draws))
            self.bundle, self.draws = bundle, draws
            return bundle
        if not self.exact:
            return make()  # the engine points the run's model at the pack's CLIP
        self.draws.replay()
        return self.bundle
