"""A pack's one CLIP (`shared_clip.SharedClip`): built once, each later run's RNGs advanced by replaying
the build's draws to exactly where its own build would leave them (so its prompt init is the solo
run's); a build whose draws do not replay falls back to building per run."""

import random

import numpy as np
import torch

from fastprompt.models.clip import load_clip
from fastprompt.runtime import rng_state, seed_everything
from fastprompt.training.shared_clip import SharedClip, same_state


def test_later_runs_share_the_clip_and_stand_where_their_own_build_leaves_them(tiny_weights):
    make = lambda: load_clip("fastprompt-tiny", str(tiny_weights))  # noqa: E731
    shared, built = SharedClip(), []
    for seed in (3, 1, 2):
        seed_everything(seed)
        bundle = shared.build(lambda: built.append(1) or make())
        state = rng_state()
        seed_everything(seed)
        make()
        assert same_state(state, rng_state())  # torch, numpy and Python as the run's own build leaves them
        assert bundle is shared.bundle
    assert shared.exact and shared.draws.draws and len(built) == 1


def test_a_build_whose_draws_do_not_replay_builds_for_every_run(tiny_weights, caplog):
    def make():  # a draw no aten op records: Python's own generator
        random.random()
        return load_clip("fastprompt-tiny", str(tiny_weights))

    shared, bundles = SharedClip(), []
    for seed in (1, 2):
        seed_everything(seed)
        bundles.append(shared.build(make))
        state = rng_state()
        seed_everything(seed)
        make()
        assert same_state(state, rng_state())
    assert not shared.exact and bundles[0] is not bundles[1]
    assert "each packed run builds its own CLIP" in caplog.text


def test_same_state_compares_every_generator():
    seed_everything(1)
    a = rng_state()
    for draw in (lambda: torch.rand(1), lambda: np.random.rand(), lambda: random.random()):
        seed_everything(1)
        draw()
        assert not same_state(a, rng_state())
    seed_everything(1)
    assert same_state(a, rng_state())
