"""A pack's one CLIP (`shared_clip.SharedClip`): built once, each later run's RNGs advanced by replaying
the build's draws to exactly where its own build would leave them (so its prompt init is the solo
run's); a build whose draws do not replay falls back to building per run."""

import random

import numpy as np
import pytest
import torch

from fastprompt.models.clip import load_clip
from fastprompt.runtime import rng_state, seed_everything
from fastprompt.training import engine, trainer
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


@pytest.mark.slow
def test_a_pack_builds_its_clip_and_opens_its_data_once(demo_beton, tiny_weights, tmp_path, monkeypatch):
    """Three packed runs: one CLIP load, one dataset open (the plans read the sidecar alone); each
    run's model on that one CLIP."""
    from fastprompt.training import TrainConfig
    from fastprompt.training.plan import plan_run

    calls = {"clip": 0, "data": 0}

    def counted(name, fn):
        return lambda *a, **kw: calls.__setitem__(name, calls[name] + 1) or fn(*a, **kw)

    monkeypatch.setattr(trainer, "load_clip", counted("clip", trainer.load_clip))
    monkeypatch.setattr(trainer, "open_dataset", counted("data", trainer.open_dataset))
    request = dict(method="coop", data=str(demo_beton), clip="fastprompt-tiny", pretrained=str(tiny_weights), shots=2,
                   epochs=1, warmup_epochs=0, batch_size=10, num_workers=1, device="cpu", compile="off")
    plans = [plan_run(TrainConfig(**request, seed=s, out=str(tmp_path / f"seed{s}"))) for s in (1, 2, 3)]
    built = []
    monkeypatch.setattr(engine, "Trainer", lambda *a, **kw: built.append(trainer.Trainer(*a, **kw)) or built[-1])
    results = engine.execute(plans, pack=3)
    assert all(r is not None for r in results)
    assert calls == {"clip": 1, "data": 1}
    assert len(built) == 3 and all(t.model.clip is built[0].model.clip for t in built)
