"""Parameter groups and Dassl's schedule: every group's lr per epoch, resolved defaults, errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.errors import FastpromptError
from fastprompt.methods import method_class
from fastprompt.training import TrainConfig
from fastprompt.training.config import default_epochs


class ConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ConstantWarmupScheduler (Dassl.pytorch dassl/optim/lr_scheduler.py), restated:
    epochs before `warmup_epoch` at `cons_lr`, then the successor scheduler takes over."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()


def dassl_lrs(lr, warmup, epochs, cons_lr=1e-5):
    """The lr of each epoch as Dassl's build_lr_scheduler (cosine, constant warm-up,
    WARMUP_RECOUNT) gives it to a trainer that steps the scheduler after every epoch."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epochs))
    if warmup > 0:
        sched = ConstantWarmup(optimizer, sched, warmup, cons_lr)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return lrs


@pytest.mark.slow
def test_two_groups_write_dassls_lr_every_epoch(demo_beton, tmp_path):
    out = tmp_path / "vlp"
    args = ["train", "--method", "vlp", "--data", str(demo_beton), "--out", str(out), "--clip", "fastprompt-tiny",
            "--pretrained", "none", "--workers", "1", "--shots", "2", "--batch-size", "10", "--epochs", "5",
            "--coop.n-ctx", "2", "--vpt.n-prompts", "2", "--lr.text", "0.02", "--lr.visual", "0.05",
            "--warmup-epochs.visual", "2", "--warmup-epochs.text", "1", "--warmup-lr", "1e-4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = {name: [line["lr"][name] for line in lines] for name in ("text", "visual")}
    assert got["text"] == pytest.approx(dassl_lrs(0.02, 1, 5, 1e-4), rel=1e-9)
    assert got["visual"] == pytest.approx(dassl_lrs(0.05, 2, 5, 1e-4), rel=1e-9)
    assert got["visual"][:2] == [1e-4, 1e-4] and got["visual"][2] == 0.05 and got["visual"][-1] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["group_lr"] == {"text": 0.02, "visual": 0.05}
    assert config["group_warmup_epochs"] == {"text": 1, "visual": 2}


def _resolve(method, dataset="eurosat", shots=16, **kw):
    config = TrainConfig(method=method, data="d.beton", out="o", shots=shots, **kw)
    return config.resolve(dataset, method_class(method).groups, {})


def test_group_defaults_and_overrides():
    cfg = _resolve("vlp")
    assert cfg.group_lr == {"text": 0.002, "visual": 0.01} and cfg.group_warmup_epochs == {"text": 1, "visual": 10}
    assert cfg.epochs == 200 and cfg.momentum == 0.9 and cfg.weight_decay == 5e-4
    imagenet = _resolve("cavpt", dataset="imagenet", shots=1)
    assert imagenet.epochs == 50 and imagenet.group_warmup_epochs == {"text": 1, "visual": 1, "cavpt": 1}
    every = _resolve("vlp", lr=0.03, warmup_epochs=2, group_lr={"visual": 0.5})
    assert every.group_lr == {"text": 0.03, "visual": 0.5} and every.group_warmup_epochs == {"text": 2, "visual": 2}
    assert every.resolve("eurosat", method_class("vlp").groups, {}) == every  # idempotent
    assert _resolve("e2mim").group_lr == {"text": 0.002, "e2mim": 0.002}


def test_epochs_by_shots_as_coop():
    assert [default_epochs(k, "eurosat") for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert [default_epochs(k, "imagenet") for k in (1, 2, 4, 8, 16)] == [50] * 5
    assert _resolve("coop", shots=2).epochs == 100 and _resolve("coop", dataset="imagenet").epochs == 50


def test_group_errors_name_the_group_and_the_fix():
    with pytest.raises(FastpromptError, match=r"lr.visual: coop trains no 'visual' group \(its groups: text\); drop --lr.visual"):
        TrainConfig(method="coop", data="d.beton", out="o", group_lr={"visual": 0.1})
    with pytest.raises(FastpromptError, match="lr.text=0 must be a number > 0"):
        TrainConfig(method="coop", data="d.beton", out="o", group_lr={"text": 0})
    with pytest.raises(FastpromptError, match="trains no 'text' group with these options"):
        TrainConfig(method="cavpt", data="d.beton", out="o", group_lr={"text": 0.1}).resolve(
            "eurosat", [g for g in method_class("cavpt").groups if g.name != "text"], {})
    with pytest.raises(FastpromptError, match=r"group visual: warm-up of 10 epochs \(the visual group's default\) leaves none "
                                              r"of the 5 epochs.*--warmup-epochs.visual"):
        _resolve("vpt-deep", epochs=5)
    with pytest.raises(FastpromptError, match=r"warm-up of 3 epochs \(--warmup-epochs.text\)"):
        _resolve("coop", epochs=3, group_warmup_epochs={"text": 3})
